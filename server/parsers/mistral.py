"""Mistral tool calls: [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...], or the newer
[TOOL_CALLS]name[ARGS]{...} form (one per [TOOL_CALLS])."""
import json

from llmserve.plugins import hookimpl
from llmserve.server.parsers import ToolCall, ToolParser, json_objects

ARGS = "[ARGS]"


class MistralToolParser(ToolParser):
    name = "mistral"
    needs_special_tokens = True  # [TOOL_CALLS] and [ARGS] are special tokens
    start = "[TOOL_CALLS]"

    def parse_calls(self, text: str) -> list[ToolCall]:
        calls = []
        for part in filter(str.strip, text.split(self.start)):
            if ARGS in part:
                name, _, arguments = part.partition(ARGS)
                calls.append(ToolCall(name.strip(), json.loads(arguments)))
            else:
                calls += [ToolCall(c["name"], c.get("arguments") or {}) for c in json_objects(part)]
        return calls


@hookimpl
def llmserve_tool_parsers():
    return {MistralToolParser.name: f"{__name__}:MistralToolParser"}
