"""Llama 3.1/3.2 JSON tool calls: the reply is {"name": ..., "parameters": {...}} (several joined by ';'), optionally
after <|python_tag|>."""
from llmserve.plugins import hookimpl
from llmserve.server.parsers import ToolCall, ToolParser, json_objects

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    needs_special_tokens = True  # <|python_tag|> is a special token
    start = "{"

    def split(self, text: str, finished: bool):
        body = text.lstrip()
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG):].lstrip()
        elif not finished and PYTHON_TAG.startswith(body):
            return "", []  # could still become the tag
        if not body.startswith("{"):  # only a reply that is nothing but calls holds tool calls
            return text, []
        return super().split(body, finished)

    def parse_calls(self, text: str) -> list[ToolCall]:
        return [ToolCall(c["name"], c.get("parameters", c.get("arguments")) or {}) for c in json_objects(text)]


@hookimpl
def llmserve_tool_parsers():
    return {Llama3JsonToolParser.name: f"{__name__}:Llama3JsonToolParser"}
