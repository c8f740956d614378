"""DeepSeek-R1's reasoning: its chat template opens <think>, so the reply is reasoning until </think>."""
from llmserve.plugins import hookimpl
from llmserve.server.parsers import ReasoningParser


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    starts_thinking = True


@hookimpl
def llmserve_reasoning_parsers():
    return {DeepSeekR1ReasoningParser.name: f"{__name__}:DeepSeekR1ReasoningParser"}
