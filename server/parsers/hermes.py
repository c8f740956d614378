"""Hermes-style tool calls, as Qwen2.5 and Qwen3 write them: <tool_call>{"name": ..., "arguments": {...}}</tool_call>."""
import json
import re

from llmserve.plugins import hookimpl
from llmserve.server.parsers import ToolCall, ToolParser

CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


class HermesToolParser(ToolParser):
    name = "hermes"
    start = "<tool_call>"

    def parse_calls(self, text: str) -> list[ToolCall]:
        calls = [json.loads(body) for body in CALL.findall(text)]
        return [ToolCall(c["name"], c.get("arguments") or {}) for c in calls]


@hookimpl
def llmserve_tool_parsers():
    return {HermesToolParser.name: f"{__name__}:HermesToolParser"}
