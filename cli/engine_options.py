"""The engine options every engine-building command takes (`llm serve`, `llm generate`, `llm chat`).

`engine_command` appends them to a command's signature, so Typer shows them in its --help, and hands
the command one `engine_args` dict instead.
"""
import functools
import inspect
import logging
from dataclasses import fields
from typing import Annotated, Any, Optional

import typer

from llmserve.config import EngineConfig

DEFAULTS = {f.name: f.default for f in fields(EngineConfig)}
HELP = {
    "attention_backend": "Attention backend, e.g. TORCH_SDPA, TRITON_ATTN, FLASHINFER (`llm plugins` lists them); "
                         "default: the platform's first usable one.",
    "dtype": "auto, float32, bfloat16 or float16 (auto: the model's, float32 on the CPU).",
    "max_model_len": "Context length (prompt + output); default: the model's.",
    "max_num_seqs": "Most requests in one batch.",
    "max_num_batched_tokens": "Most tokens in one batch (the chunked-prefill budget); default: 2048 on the CPU, "
                              "8192 on GPUs.",
    "block_size": "Tokens per KV-cache block.",
    "enable_prefix_caching": "Reuse the KV cache of shared prompt prefixes.",
    "load_format": "auto (safetensors, else PyTorch .bin), safetensors, pt (.bin), gguf or dummy (random weights).",
    "seed": "Random seed of the engine.",
    "chat_template": "Chat template (Jinja text or a file) instead of the model's.",
    "generation_config": "'auto': the model's generation_config.json gives the sampling defaults; "
                         "'vllm': ignore it; or a folder holding a generation_config.json.",
    "tokenizer": "Tokenizer folder or hub id, if not the model's.",
    "skip_tokenizer_init": "Run without a tokenizer: token-id prompts only, outputs without text.",
    "kv_cache_memory_bytes": "Bytes for the KV cache (default: 4 GiB on the CPU, the free GPU memory on a GPU).",
    "gpu_memory_utilization": "Fraction of GPU memory the engine may use.",
    "enforce_eager": "Run every step eagerly (no CUDA graphs).",
    "max_graph_prefill_tokens": "Steps with prompt tokens, up to this many tokens, run in CUDA graph pieces (attention "
                                "runs eagerly between them); 0: CUDA graphs for decode steps only.",
    "async_scheduling": "Launch the next decode step before reading this one's tokens (default: on GPUs).",
    "max_logprobs": "The most logprobs (and prompt logprobs) a request may ask for.",
    "distributed_executor_backend": "How tensor-parallel ranks run: mp (processes on this machine) or ray (Ray "
                                    "actors; needs the ray extra of llmserve); default: ray when RAY_ADDRESS is set "
                                    "or the ranks outnumber this machine's GPUs.",
    "pipeline_parallel_size": "Stages to split the layers into (one process per stage and tensor-parallel rank).",
    "quantization": "Quantize the weights at load (fp8: per-channel fp8 weights, per-token fp8 activations) or "
                    "name the checkpoint's method (default: the one its quantization_config names); `llm plugins` "
                    "lists the methods.",
    "kv_cache_dtype": "The KV cache's dtype: auto (the model's) or fp8 (e4m3 with a scale per layer: twice the "
                      "tokens in the same memory).",
    "enable_expert_parallel": "Mixture-of-experts models: each tensor-parallel rank holds whole experts (a share of "
                              "them) instead of a slice of every expert.",
    "tensor_parallel_size": "Ranks to split every layer over (one process and one device each; the CPU splits its "
                            "cores).",
}
# vLLM's engine options that llmserve takes with the values it supports today (others are refused, saying why)
VLLM_OPTIONS = {"trust_remote_code": bool, "revision": Optional[str], "tokenizer_revision": Optional[str],
                "download_dir": Optional[str], "tokenizer_mode": str, "enable_chunked_prefill": Optional[bool],
                "disable_log_stats": bool}
LOG_LEVELS = ("debug", "info", "warning", "error")
ModelOption = Annotated[Optional[str], typer.Option("--model", "-m", help="HF folder, .gguf file or hub id "
                                                                           "(default: the embedded model).")]


def option(name: str, annotation: Any, help: str | None = None, panel: str = "Engine",
           aliases: tuple[str, ...] = ()) -> inspect.Parameter:
    flags = (f"--{name.replace('_', '-')}", *aliases) if aliases else ()
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=DEFAULTS[name], annotation=Annotated[
        annotation, typer.Option(*flags, help=help or HELP[name], rich_help_panel=panel)])


def vllm_option(name: str, annotation: Any) -> inspect.Parameter:
    from llmserve.config import SUPPORTED_ONLY

    why = SUPPORTED_ONLY.get(name, (None, "accepted; llmserve logs no periodic statistics"))[1]
    return option(name, annotation, f"vLLM's option: {why}.", "Engine (vLLM's options)")


ENGINE_PARAMETERS = [
    option("attention_backend", Optional[str]), option("dtype", str), option("max_model_len", Optional[int]),
    option("max_num_seqs", int), option("max_num_batched_tokens", Optional[int]), option("block_size", int),
    option("enable_prefix_caching", bool), option("load_format", str), option("seed", int),
    option("chat_template", Optional[str]), option("generation_config", str), option("tokenizer", Optional[str]),
    option("skip_tokenizer_init", bool), option("enforce_eager", bool), option("max_graph_prefill_tokens", int), option("async_scheduling", Optional[bool]),
    option("kv_cache_memory_bytes", Optional[int]), option("gpu_memory_utilization", float),
    option("max_logprobs", int), option("tensor_parallel_size", int, aliases=("-tp",)),
    option("pipeline_parallel_size", int, aliases=("-pp",)), option("distributed_executor_backend", Optional[str]),
    option("quantization", Optional[str], aliases=("-q",)), option("kv_cache_dtype", str),
    option("enable_expert_parallel", bool),
] + [vllm_option(name, annotation) for name, annotation in VLLM_OPTIONS.items()]
LOG_LEVEL = inspect.Parameter("log_level", inspect.Parameter.KEYWORD_ONLY, default="info", annotation=Annotated[
    str, typer.Option(help=f"Log level: {', '.join(LOG_LEVELS)}.", rich_help_panel="Engine")])


def engine_command(command):
    """Give `command(..., engine_args)` the engine options (and --log-level, applied here)."""
    own = [p for p in inspect.signature(command).parameters.values() if p.name != "engine_args"]

    @functools.wraps(command)
    def wrapper(**kwargs):
        log_level = kwargs.pop("log_level").lower()
        if log_level not in LOG_LEVELS:
            raise typer.BadParameter(f"must be one of {', '.join(LOG_LEVELS)}", param_hint="--log-level")
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        engine_args = {p.name: kwargs.pop(p.name) for p in ENGINE_PARAMETERS}
        return command(**kwargs, engine_args=engine_args)

    wrapper.__signature__ = inspect.Signature(own + ENGINE_PARAMETERS + [LOG_LEVEL])
    return wrapper


def build_engine(engine_class, model: str | None, engine_args: dict):
    """The engine, or a clear error and exit status 2 when the arguments or the model are wrong."""
    try:
        return engine_class(EngineConfig(model=model, **engine_args))
    except ValueError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        raise typer.Exit(2) from None
