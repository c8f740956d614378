"""An llmserve plugin. llmserve imports this module through its `llmserve.plugins` entry point and calls the hooks.

Keep this module light: it is imported whenever llmserve starts (even by `llm plugins`), so it names its classes
as "module:Class" strings, and those modules are imported only when the backend or model is used.
"""
from llmserve.plugins import PLUGIN_API_VERSION, hookimpl

if PLUGIN_API_VERSION != 1:  # written against version 1 of the hooks: fail loudly (llmserve reports and skips us)
    raise ImportError(f"llmserve-example-plugin supports llmserve plugin API 1, not {PLUGIN_API_VERSION}")


@hookimpl
def llmserve_attention_backends() -> dict[str, str]:
    return {"EXAMPLE_ATTN": f"{__name__}.attention:ExampleAttentionBackend",
            "EXAMPLE_COMPILED_ATTN": f"{__name__}.attention:ExampleCompiledAttentionBackend"}


@hookimpl
def llmserve_models() -> dict[str, str]:
    return {"ExampleLlamaForCausalLM": f"{__name__}.model:ExampleLlamaForCausalLM"}
