"""One plugin registry per process: built-in modules first, then the `llmserve.plugins` entry points."""
import functools
import importlib
import importlib.metadata
import logging
import os
import pkgutil
from dataclasses import dataclass, field

import pluggy

from llmserve.plugins import PROJECT, hookspecs

logger = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "llmserve.plugins"
KINDS = {"platform": "llmserve_platforms", "attention_backend": "llmserve_attention_backends",
         "model": "llmserve_models", "tool_parser": "llmserve_tool_parsers",
         "reasoning_parser": "llmserve_reasoning_parsers", "executor": "llmserve_executors",
         "quantization": "llmserve_quantization_methods"}


@dataclass(frozen=True)
class Registration:
    kind: str
    name: str
    target: str  # "package.module:Class"
    distribution: str
    version: str

    def load(self):
        module, _, attr = self.target.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except Exception as e:
            raise RuntimeError(f"{self.kind} {self.name!r} from {self.distribution} failed to load "
                               f"({self.target}): {type(e).__name__}: {e}") from e


@dataclass
class PluginRegistry:
    entries: dict[str, dict[str, Registration]] = field(default_factory=lambda: {k: {} for k in KINDS})
    failures: dict[str, str] = field(default_factory=dict)  # plugin name -> error

    def of(self, kind: str) -> dict[str, Registration]:
        return self.entries[kind]

    def add(self, kind: str, name: str, target: str, distribution: str, version: str) -> None:
        existing = self.entries[kind].get(name)
        if existing:
            raise RuntimeError(f"{kind} {name!r} is registered twice: by {existing.distribution} and by {distribution}")
        self.entries[kind][name] = Registration(kind, name, target, distribution, version)


def builtin_modules() -> list[str]:
    import llmserve.backends
    import llmserve.models
    import llmserve.quantization
    import llmserve.server.parsers

    modules = ["llmserve.plugins.platforms", "llmserve.executor"]
    for package in (llmserve.backends, llmserve.models, llmserve.quantization, llmserve.server.parsers):
        modules += [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__) if not m.ispkg]
    return modules


@functools.cache
def registry() -> PluginRegistry:
    """Load every plugin once per process (a spawned worker loads them again)."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    reg = PluginRegistry()
    origin: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)
    version = importlib.metadata.version("llmserve")
    for module in builtin_modules():
        pm.register(importlib.import_module(module), name=module)
        origin[module] = ("llmserve", version)
    allowed = os.environ.get("LLMSERVE_PLUGINS")
    allow = {n.strip() for n in allowed.split(",") if n.strip()} if allowed is not None else None
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if allow is not None and ep.name not in allow:
            continue
        dist = (ep.dist.name, ep.dist.version) if ep.dist else (ep.name, "?")
        try:
            pm.register(ep.load(), name=ep.name)
            origin[ep.name] = dist
        except Exception as e:
            reg.failures[ep.name] = f"{type(e).__name__}: {e}"
            logger.error("plugin %r (%s) failed to load and is skipped: %s: %s", ep.name, dist[0], type(e).__name__, e)
    for kind, hook_name in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            try:
                provided = impl.function() or {}
            except Exception as e:
                reg.failures[impl.plugin_name] = f"{type(e).__name__}: {e}"
                logger.error("plugin %r failed in %s and is skipped: %s", impl.plugin_name, hook_name, e)
                continue
            for name, target in provided.items():
                reg.add(kind, name, target, *origin[impl.plugin_name])
    return reg
