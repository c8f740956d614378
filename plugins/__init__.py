"""The plugin contract: pluggy hooks through which platforms, attention backends and models register."""
import pluggy

PROJECT = "llmserve"
PLUGIN_API_VERSION = 1  # raised when a hook's meaning changes; plugins may check it
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["PLUGIN_API_VERSION", "PROJECT", "hookimpl", "hookspec"]
