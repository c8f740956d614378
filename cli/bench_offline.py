"""`llm bench throughput` and `llm bench latency`: the engine in this process, against the memory-bandwidth limit."""
import json
import random
import time
from dataclasses import dataclass
from typing import Annotated, Optional

import numpy as np
import torch
import typer

from llmserve.cli.main import bench_app
from llmserve.cli.engine_options import ModelOption, build_engine, engine_command
from llmserve.engine import LLMEngine
from llmserve.sampling_params import SamplingParams

Lengths = Annotated[str, typer.Option(help="N, or LO:HI for lengths drawn uniformly from LO..HI (inclusive).")]


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def parse_lengths(text: str, option: str) -> tuple[int, int]:
    try:
        low, _, high = text.partition(":")
        low, high = int(low), int(high or low)
    except ValueError:
        raise typer.BadParameter(f"expected N or LO:HI, got {text!r}", param_hint=option) from None
    if not 1 <= low <= high:
        raise typer.BadParameter(f"lengths must satisfy 1 <= LO <= HI, got {text!r}", param_hint=option)
    return low, high


def make_workload(engine: LLMEngine, num_prompts: int, input_len: str, output_len: str, dataset: str | None,
                  seed: int) -> Workload:
    """Random token-id prompts (or a file's prompts, tokenized) and output lengths, the same for every seed."""
    if dataset:
        from llmserve.cli.bench import read_prompt_file  # here: cli.bench and this module load through cli.main

        output_lens = random_workload(1, num_prompts, "1", output_len, seed).output_lens
        return Workload([engine.tokenize(text) for text in read_prompt_file(dataset, num_prompts)], output_lens)
    return random_workload(engine.vocab_size, num_prompts, input_len, output_len, seed)


def random_workload(vocab: int, num_prompts: int, input_len: str, output_len: str, seed: int) -> Workload:
    """Random token ids below `vocab` and output lengths, as LOW:HIGH ranges; a peer engine's benchmark calls it too,
    for the same workload."""
    rng = random.Random(seed)
    out_low, out_high = parse_lengths(output_len, "--output-len")
    output_lens = [rng.randint(out_low, out_high) for _ in range(num_prompts)]
    in_low, in_high = parse_lengths(input_len, "--input-len")
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(in_low, in_high))] for _ in range(num_prompts)]
    return Workload(prompts, output_lens)


def memory_bandwidth(engine: LLMEngine, size: int = 1 << 30) -> float:
    """Measured copy bandwidth in bytes/s (read + write) of one large buffer on the device."""
    device = engine.runner.device
    source = torch.empty(size // 2, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(2):
        target.copy_(source)
    sync = lambda: engine.platform.synchronize(device)
    sync()
    start, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        target.copy_(source)
    sync()
    return 2 * source.numel() * repeats / (time.perf_counter() - start)


def weight_bytes(engine: LLMEngine, tokens_per_step: float | None = None) -> float:
    """The weight bytes one step reads: every weight, except that a mixture of experts' layer reads only the experts
    its tokens pick, E * (1 - (1 - k / E) ** tokens) of them expected under uniform routing (random dummy routers
    route about uniformly; a throughput run takes its mean tokens per step); `tokens_per_step` None: every expert."""
    from llmserve.models.layers.moe import SparseMoeBlock

    total = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    if tokens_per_step is None:
        return total
    for block in (m for m in engine.runner.model.modules() if isinstance(m, SparseMoeBlock)):
        experts = block.experts
        stacked = sum(p.numel() * p.element_size() for p in experts.parameters())
        picked = experts.num_experts * (1 - (1 - block.top_k / experts.num_experts) ** tokens_per_step)
        total -= stacked * (1 - picked / experts.num_experts)
    return total


def kv_bytes_per_token(engine: LLMEngine) -> int:
    spec, layers = engine.runner.spec, len(engine.runner.layers())
    return 2 * spec.num_kv_heads * spec.head_dim * spec.cache_dtype.itemsize * layers


def add_all(engine: LLMEngine, workload: Workload, ignore_eos: bool = True) -> None:
    """Queue every request of the workload, greedy."""
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=ignore_eos) for n in workload.output_lens]
    for i, (prompt, p) in enumerate(zip(workload.prompts, params)):
        engine.add_request(str(i), prompt, p, prompt)


def run_all(engine: LLMEngine, workload: Workload, ignore_eos: bool) -> tuple[float, int]:
    """Every request at once; returns the wall time and the output tokens."""
    add_all(engine, workload, ignore_eos)
    output_tokens, start = 0, time.perf_counter()
    while engine.has_unfinished_requests():
        output_tokens += sum(len(o.outputs[0].token_ids) for o in engine.step(finished_only=True))
    return time.perf_counter() - start, output_tokens


def warm_up(engine: LLMEngine) -> None:
    run_all(engine, Workload([[1] * 16] * 2, [4, 4]), ignore_eos=True)


@bench_app.command("throughput")
@engine_command
def bench_throughput(
    model: ModelOption = None,
    num_prompts: Annotated[int, typer.Option(help="Requests.")] = 1000,
    input_len: Lengths = "1024", output_len: Lengths = "128",
    dataset: Annotated[Optional[str], typer.Option(help="A file of prompts (lines, or JSON lines with 'prompt') "
                                                        "instead of random token ids.")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Generate exactly the output lengths.")] = True,
    workload_seed: Annotated[int, typer.Option(help="Seed of the random workload.")] = 0,
    output_json: Annotated[Optional[str], typer.Option(help="Write the results as JSON here.")] = None,
    *, engine_args: dict,
) -> None:
    """Offline throughput: all requests at once through the engine, like `vllm bench throughput`."""
    engine = build_engine(LLMEngine, model, engine_args)
    workload = make_workload(engine, num_prompts, input_len, output_len, dataset, workload_seed)
    warm_up(engine)
    steps_before = engine.stats["steps"]
    wall, output_tokens = run_all(engine, workload, ignore_eos)
    steps = engine.stats["steps"] - steps_before
    bandwidth = memory_bandwidth(engine)
    # Each step reads every weight once, and each output token's step reads its request's whole KV cache.
    kv_read = kv_bytes_per_token(engine) * sum(len(p) * n + n * (n - 1) // 2
                                               for p, n in zip(workload.prompts, workload.output_lens))
    floor = (steps * weight_bytes(engine, (workload.prompt_tokens + output_tokens) / steps) + kv_read) / bandwidth
    result = {"num_requests": num_prompts, "prompt_tokens": workload.prompt_tokens, "output_tokens": output_tokens,
              "elapsed_s": wall, "requests_per_s": num_prompts / wall,
              "total_tokens_per_s": (workload.prompt_tokens + output_tokens) / wall,
              "output_tokens_per_s": output_tokens / wall, "steps": steps, "memory_bandwidth_gb_s": bandwidth / 1e9,
              "memory_floor_s": floor, "roofline_fraction": floor / wall,
              "engine_args": recorded_args(engine, model, engine_args)}
    report(result, output_json, [
        ("Requests/s", "requests_per_s", ".2f"), ("Total tokens/s", "total_tokens_per_s", ".1f"),
        ("Output tokens/s", "output_tokens_per_s", ".1f"), ("Elapsed (s)", "elapsed_s", ".2f"),
        ("Engine steps", "steps", "d"), ("Memory bandwidth (GB/s)", "memory_bandwidth_gb_s", ".0f"),
        ("Memory-read floor (s)", "memory_floor_s", ".2f"), ("Fraction of roofline", "roofline_fraction", ".2f")])


@bench_app.command("latency")
@engine_command
def bench_latency(
    model: ModelOption = None,
    batch_size: Annotated[int, typer.Option(help="Requests in the batch.")] = 1,
    input_len: Annotated[int, typer.Option(help="Prompt tokens per request.")] = 32,
    output_len: Annotated[int, typer.Option(help="Output tokens per request.")] = 128,
    num_iters: Annotated[int, typer.Option(help="Timed repetitions.")] = 3,
    output_json: Annotated[Optional[str], typer.Option(help="Write the results as JSON here.")] = None,
    *, engine_args: dict,
) -> None:
    """Latency of one batch: time per output token (per decode step), like `vllm bench latency`."""
    engine = build_engine(LLMEngine, model, engine_args | {"enable_prefix_caching": False})
    workload = make_workload(engine, batch_size, str(input_len), str(output_len), None, 0)
    warm_up(engine)
    walls = [run_all(engine, workload, ignore_eos=True)[0] for _ in range(num_iters)]
    prefill = Workload(workload.prompts, [1] * batch_size)
    prefill_wall = float(np.median([run_all(engine, prefill, ignore_eos=True)[0] for _ in range(num_iters)]))
    wall = float(np.median(walls))
    bandwidth = memory_bandwidth(engine)
    result = {"batch_size": batch_size, "input_len": input_len, "output_len": output_len, "latency_s": wall,
              "latencies_s": walls, "prefill_s": prefill_wall,
              "time_per_output_token_ms": (wall - prefill_wall) / max(output_len - 1, 1) * 1000,
              "weight_read_floor_ms": weight_bytes(engine, batch_size) / bandwidth * 1000,
              "memory_bandwidth_gb_s": bandwidth / 1e9, "engine_args": recorded_args(engine, model, engine_args)}
    report(result, output_json, [
        ("Batch latency (s, median)", "latency_s", ".3f"), ("Prefill (s)", "prefill_s", ".4f"),
        ("Time per output token (ms)", "time_per_output_token_ms", ".2f"),
        ("Weight-read floor (ms)", "weight_read_floor_ms", ".2f"),
        ("Memory bandwidth (GB/s)", "memory_bandwidth_gb_s", ".0f")])


def recorded_args(engine: LLMEngine, model: str | None, engine_args: dict) -> dict:
    """The engine arguments for the JSON results, with the step budget the platform's default resolved to."""
    return engine_args | {"model": model, "max_num_batched_tokens": engine.config.max_num_batched_tokens}


def report(result: dict, output_json: str | None, rows: list[tuple[str, str, str]]) -> None:
    if output_json:
        with open(output_json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    typer.echo("=" * 50)
    for label, key, fmt in rows:
        typer.echo(f"{label:<36}{result[key]:>14{fmt}}")
    typer.echo("=" * 50)
