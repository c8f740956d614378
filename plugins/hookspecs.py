"""Hook specifications. Each hook returns {name: "package.module:Class"}; classes are imported only when used."""
from llmserve.plugins import hookspec


@hookspec
def llmserve_platforms() -> dict[str, str]:
    """Platforms by name (cpu, cuda, ...): classes implementing llmserve.interfaces.Platform."""


@hookspec
def llmserve_attention_backends() -> dict[str, str]:
    """Attention backends by name (TORCH_SDPA, ...): subclasses of llmserve.interfaces.AttentionBackend."""


@hookspec
def llmserve_models() -> dict[str, str]:
    """Model classes by HF `architectures` name (LlamaForCausalLM, ...)."""


@hookspec
def llmserve_tool_parsers() -> dict[str, str]:
    """Tool-call parsers by name (hermes, llama3_json, mistral): subclasses of llmserve.server.parsers.ToolParser."""


@hookspec
def llmserve_reasoning_parsers() -> dict[str, str]:
    """Reasoning parsers by name (qwen3, deepseek_r1): subclasses of llmserve.server.parsers.ReasoningParser."""


@hookspec
def llmserve_executors() -> dict[str, str]:
    """Distributed executors by name (mp, ray): subclasses of llmserve.executor.Workers, which start the
    tensor-parallel ranks 1..N-1 and tell rank 0 when one is gone."""


@hookspec
def llmserve_quantization_methods() -> dict[str, str]:
    """Quantization methods by name (fp8, gptq, awq, or a checkpoint's quant_method): subclasses of
    llmserve.interfaces.QuantizationMethod."""
