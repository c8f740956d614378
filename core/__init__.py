"""llmserve: a small, plugin-based LLM inference and serving engine."""
from llmserve.config import EngineConfig
from llmserve.llm import LLM
from llmserve.outputs import CompletionOutput, Logprob, RequestOutput
from llmserve.sampling_params import SamplingParams
from llmserve.structured_outputs import StructuredOutputsParams

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "Logprob", "RequestOutput", "SamplingParams",
           "StructuredOutputsParams"]
__version__ = "0.1.0"
