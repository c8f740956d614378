from dataclasses import dataclass, fields

import torch

DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "half": torch.float16}
LOAD_FORMATS = ("auto", "safetensors", "pt", "gguf", "dummy")
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}  # None: the model's


# vLLM engine argument -> (the values llmserve supports today, why / what instead)
SUPPORTED_ONLY = {
    "trust_remote_code": ((False,), "llmserve runs its own implementation of each architecture and never runs a "
                                    "checkpoint's code; supported: False"),
    "revision": ((None,), "hub downloads take the default branch; give a local folder for another revision"),
    "tokenizer_revision": ((None,), "hub downloads take the default branch; give a local tokenizer folder"),
    "download_dir": ((None,), "hub downloads go to the Hugging Face cache (HF_HOME moves it)"),
    "tokenizer_mode": (("auto",), "supported: 'auto' (transformers' fast tokenizer where the model has one)"),
    "enable_chunked_prefill": ((None, True), "prefill is always chunked under max_num_batched_tokens; supported: "
                                             "True"),
}


@dataclass
class EngineConfig:
    """Everything an engine is built from; values are checked when it is made."""

    model: str | None = None  # None: the embedded default model
    tokenizer: str | None = None
    skip_tokenizer_init: bool = False  # no tokenizer: token-id prompts only, outputs without text
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: the platform's default (2048 on the CPU, 8192 on GPUs)
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    attention_backend: str | None = None
    load_format: str = "auto"
    chat_template: str | None = None  # a Jinja template or a file holding one; None: the model's
    generation_config: str = "auto"  # "auto": the model's generation_config.json defaults; "vllm": ours; or a folder
    device: str | None = None  # None: the detected platform's device
    enforce_eager: bool = False  # True: no CUDA graphs
    # steps with prompt tokens, up to this many tokens, run in CUDA graph pieces (attention eager between them);
    # 0: graphs for decode steps only
    max_graph_prefill_tokens: int = 1024
    async_scheduling: bool | None = None  # launch decode step N+1 before reading step N's tokens; None: on GPUs
    max_logprobs: int = 20  # the most logprobs (and prompt logprobs) a request may ask for
    # vLLM's engine arguments that llmserve takes only with the values in SUPPORTED_ONLY (checked below)
    trust_remote_code: bool = False
    revision: str | None = None
    tokenizer_revision: str | None = None
    download_dir: str | None = None
    tokenizer_mode: str = "auto"
    enable_chunked_prefill: bool | None = None
    # a quantization method (`llm plugins` lists them): weights quantized at load ("fp8"), or the checkpoint's own
    # format, which its quantization_config names (None: that, or none)
    quantization: str | None = None
    kv_cache_dtype: str = "auto"  # "fp8" (e4m3, scaled per layer): half the bytes of a 16-bit cache; "auto": the model's
    tensor_parallel_size: int = 1
    # "mp" (processes here), "ray" or a plugin's; None: ray when RAY_ADDRESS is set or the ranks outnumber this
    # machine's GPUs, else mp
    distributed_executor_backend: str | None = None
    pipeline_parallel_size: int = 1
    # a mixture of experts' experts split whole over the tensor-parallel ranks (E / ranks each) instead of each
    # expert's weights split over them
    enable_expert_parallel: bool = False
    disable_log_stats: bool = False  # llmserve logs no periodic statistics: True and False both hold

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

        check(self.dtype == "auto" or self.dtype in DTYPES, "dtype", f"must be 'auto' or one of {sorted(DTYPES)}")
        check(self.max_model_len is None or self.max_model_len >= 1, "max_model_len", "must be >= 1")
        check(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        check(self.max_graph_prefill_tokens >= 0, "max_graph_prefill_tokens", "must be >= 0")
        check(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1, "max_num_batched_tokens",
              "must be >= 1")
        check(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128, 256), "block_size", "must be a power of two up to 256")
        check(self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0, "kv_cache_memory_bytes", "must be > 0")
        check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")
        check(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", f"must be one of {list(KV_CACHE_DTYPES)}")
        check(self.load_format in LOAD_FORMATS, "load_format", f"must be one of {LOAD_FORMATS}")
        check(self.load_format != "gguf" or str(self.model).endswith(".gguf"), "load_format",
              f"'gguf' needs a .gguf model file (model={self.model!r})")
        check(self.max_logprobs >= 0, "max_logprobs", "must be >= 0")
        check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        check(self.pipeline_parallel_size >= 1, "pipeline_parallel_size", "must be >= 1")
        for name, (supported, why) in SUPPORTED_ONLY.items():
            check(getattr(self, name) in supported, name, f"is not supported with this value yet ({why})")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine argument(s): {', '.join(unknown)}; llmserve takes: {', '.join(sorted(known))}")
        return cls(**kwargs)


def resolve_dtype(requested: str, model_dtype: torch.dtype | None, platform_default: torch.dtype) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    return model_dtype if model_dtype in (torch.float32, torch.bfloat16, torch.float16) else platform_default
