"""Qwen3's reasoning: <think>...</think> before the answer (absent when thinking is off)."""
from llmserve.plugins import hookimpl
from llmserve.server.parsers import ReasoningParser


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"


@hookimpl
def llmserve_reasoning_parsers():
    return {Qwen3ReasoningParser.name: f"{__name__}:Qwen3ReasoningParser"}
