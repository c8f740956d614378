"""Parsers of a chat reply's text: tool calls (`--tool-call-parser`) and reasoning (`--reasoning-parser`).

Each parser is a module of this package (or of a plugin package) registered through the `llmserve_tool_parsers` /
`llmserve_reasoning_parsers` hooks. A parser works on the whole text generated so far: `finished` says whether more
may come, so a streaming reply holds back what could still turn out to be a tool call or the end of the reasoning.
"""
import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from llmserve.errors import ParamError
from llmserve.plugins.manager import registry


@dataclass
class ToolCall:
    name: str
    arguments: dict  # parsed JSON

    def to_openai(self, index: int | None = None) -> dict:
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}
        return call if index is None else {"index": index} | call


@dataclass
class ReplyParts:
    """A reply's text split into what the model thought, what it said and which tools it called."""

    content: str
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


class ToolParser(ABC):
    name: ClassVar[str]
    start: ClassVar[str]  # text that opens the tool calls: content before it is plain text
    needs_special_tokens: ClassVar[bool] = False  # the markers are special tokens, which detokenizing would drop

    @abstractmethod
    def parse_calls(self, text: str) -> list[ToolCall]:
        """The tool calls in `text`, which starts at `start` (ValueError when it does not parse)."""

    def split(self, text: str, finished: bool) -> tuple[str, list[ToolCall]]:
        """(content, tool calls). Until `finished`, content stops where tool calls begin, or could begin."""
        begin = text.find(self.start)
        if begin < 0:
            return (text, []) if finished else (text[:len(text) - partial_prefix(text, self.start)], [])
        if not finished:
            return text[:begin], []
        try:
            return text[:begin], self.parse_calls(text[begin:])
        except (ValueError, KeyError, TypeError):  # not a well-formed call after all: the text stays content
            return text, []


class ReasoningParser(ABC):
    name: ClassVar[str]
    open_tag: ClassVar[str] = "<think>"
    close_tag: ClassVar[str] = "</think>"
    starts_thinking: ClassVar[bool] = False  # the prompt already opened the reasoning (DeepSeek-R1's template)

    def split(self, text: str, finished: bool) -> tuple[str | None, str]:
        """(reasoning, the rest). Until `finished`, a possible partial tag at the end is held back."""
        stripped = text.lstrip()
        inside = self.starts_thinking
        if stripped.startswith(self.open_tag):
            stripped, inside = stripped[len(self.open_tag):], True
        elif not inside:
            if not finished and partial_prefix(stripped, self.open_tag) == len(stripped):
                return None, ""  # the reply so far could be the start of "<think>"
            return None, text
        stripped = stripped.lstrip("\n")  # the same while the reasoning streams as once it ends
        end = stripped.find(self.close_tag)
        if end < 0:
            if finished:
                return stripped, ""
            # hold back what may start the close tag, and newlines that would go if it follows
            return stripped[:len(stripped) - partial_prefix(stripped, self.close_tag)].rstrip("\n"), ""
        return stripped[:end].rstrip("\n"), stripped[end + len(self.close_tag):].lstrip("\n")


def partial_prefix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that `marker` starts with (text held back while streaming)."""
    for n in range(min(len(marker), len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def load_parser(kind: str, name: str | None):
    """The parser class registered under `name` (None: none), or a clear error listing the registered ones."""
    if name is None:
        return None
    parsers = registry().of(kind)
    if name not in parsers:
        raise ValueError(f"unknown {kind.replace('_', ' ')} {name!r}; registered: {', '.join(sorted(parsers))}")
    return parsers[name].load()


def json_objects(text: str) -> list[dict]:
    """Consecutive JSON values in `text` (separated by whitespace, ';' or ','), flattening lists."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while True:
        while at < len(text) and text[at] in " \t\r\n;,":
            at += 1
        if at >= len(text):
            return values
        value, at = decoder.raw_decode(text, at)
        values += value if isinstance(value, list) else [value]


class ForcedToolCalls(ToolParser):
    """The reply of a request whose tool_choice was 'required' or named a function: JSON that structured outputs
    held to the schema of `tool_call_schema` (a list of {name, parameters}, or the named function's arguments)."""

    name = "forced"
    start = ""

    def __init__(self, function: str | None = None) -> None:
        self.function = function  # the named function; None: 'required', any of the tools

    def split(self, text: str, finished: bool) -> tuple[str, list[ToolCall]]:
        if not finished:
            return "", []
        try:
            return "", self.parse_calls(text)
        except (ValueError, KeyError, TypeError):  # cut short (max_tokens): what was generated stays content
            return text, []

    def parse_calls(self, text: str) -> list[ToolCall]:
        value = json.loads(text)
        if self.function is not None:
            return [ToolCall(self.function, value)]
        return [ToolCall(call["name"], call["parameters"]) for call in value]


def tool_call_schema(tools: list[dict], function: str | None, parallel: bool) -> dict:
    """The JSON schema a forced reply must follow: the named function's parameters, or a list of calls. Each
    function's `$defs` / `definitions` move to the top, where its `#/$defs/...` references resolve."""
    parameters = {t["function"]["name"]: dict(t["function"].get("parameters") or {"type": "object"}) for t in tools}
    if function is not None:
        return parameters[function]
    shared: dict[str, dict] = {}
    for name, schema in parameters.items():
        for key in ("$defs", "definitions"):
            for definition, value in schema.pop(key, {}).items():
                if shared.setdefault(key, {}).setdefault(definition, value) != value:
                    raise ParamError("tools", f"tools define {key}/{definition} differently; rename one")
    calls = [{"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
              "required": ["name", "parameters"], "additionalProperties": False}
             for name, schema in parameters.items()]
    return ({"type": "array", "items": {"anyOf": calls}, "minItems": 1} | ({} if parallel else {"maxItems": 1})
            | shared)


@dataclass
class ReplyParser:
    """A chat reply's reasoning (when a reasoning parser is set), then its tool calls (when tools may be called)."""

    reasoning: ReasoningParser | None = None
    tools: ToolParser | None = None
    parallel_tool_calls: bool = True

    def parse(self, text: str, finished: bool) -> ReplyParts:
        reasoning, rest = self.reasoning.split(text, finished) if self.reasoning else (None, text)
        content, calls = self.tools.split(rest, finished) if self.tools else (rest, [])
        return ReplyParts(content, reasoning, calls if self.parallel_tool_calls else calls[:1])
