"""Where a whole throughput run's time goes: the steps by phase and batch size, and the GPU kernels by kind.

    python benchmarks/profile_throughput.py --model benchmarks/models/Qwen3-0.6B --num-prompts 256 \\
        --input-len 100:1024 --output-len 100:1024

Runs `llm bench throughput`'s workload twice on one engine (dummy bf16 weights, EOS ignored): once timing every
step, once under torch.profiler. The first table groups the steps: prefill steps (any prompt tokens) and decode
steps by how many requests run, with the KV cache each step reads at the measured bandwidth as its floor. The
second sums the GPU kernels of the whole run by kind; wall minus kernel time is GPU idle (host-bound).
"""
import json
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from llmserve.cli.bench_offline import (add_all, kv_bytes_per_token, make_workload, memory_bandwidth, warm_up,
                                        weight_bytes)
from llmserve.config import EngineConfig
from llmserve.engine import LLMEngine

from gpu_throughput import workload_parser  # noqa: I001 (this script's folder is on sys.path)

KINDS = [("attention", ("attention", "BatchPrefill", "BatchDecode", "MergeState")),
         ("attention reduce", ("reduce_segments",)), ("KV write", ("write_kv",)), ("SiLU-and-multiply", ("silu",)),
         ("GEMM", ("gemm", "gemv", "cutlass", "nvjet", "sm90_", "sm80_", "splitk", "splitK")),
         ("RMSNorm", ("rms_norm",)), ("rotary", ("rotary",)), ("sampling", ("argmax", "logsumexp", "reduce_kernel")),
         ("copies", ("copy", "Memcpy", "Memset", "fill"))]
BUCKETS = [256, 192, 128, 64, 32, 16, 1, 0]


def kind_of(name: str) -> str:
    return next((kind for kind, keys in KINDS if any(k in name for k in keys)), "other elementwise")


def timed_run(engine: LLMEngine, workload) -> list[dict]:
    add_all(engine, workload)
    steps, last = [], time.perf_counter()
    while engine.has_unfinished_requests():
        running = engine.scheduler.running
        prompt_before, context = engine.stats["prompt_tokens"], sum(r.num_tokens for r in running)
        engine.step(finished_only=True)
        now = time.perf_counter()
        steps.append({"s": now - last, "running": len(running), "context": context,
                      "prefill": engine.stats["prompt_tokens"] > prompt_before})
        last = now
    return steps


def step_table(steps: list[dict], kv_per_token: int, bandwidth: float) -> list[dict]:
    groups = defaultdict(list)
    for s in steps:
        key = "prefill" if s["prefill"] else f"decode >= {next(b for b in BUCKETS if s['running'] >= b)}"
        groups[key].append(s)
    rows = []
    for key, group in groups.items():
        wall = sum(s["s"] for s in group)
        kv_floor = sum(s["context"] for s in group) * kv_per_token / bandwidth
        rows.append({"steps": key, "count": len(group), "wall_s": wall, "ms_per_step": wall / len(group) * 1000,
                     "kv_floor_s": kv_floor})
    return rows


def kernel_table(engine: LLMEngine, workload) -> tuple[float, list[dict]]:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        timed_run(engine, workload)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    totals = defaultdict(float)
    calls = defaultdict(int)
    for event in prof.key_averages():
        if event.self_device_time_total > 0:
            totals[kind_of(event.key)] += event.self_device_time_total / 1e6
            calls[kind_of(event.key)] += event.count
    return wall, [{"kind": k, "gpu_s": v, "calls": calls[k]} for k, v in sorted(totals.items(), key=lambda kv: -kv[1])]


def main() -> None:
    parser = workload_parser(__doc__)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"])
    parser.add_argument("--json", help="write the full results here")
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(model=args.model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                                    max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                    attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
                                    kv_cache_dtype=args.kv_cache_dtype))
    workload = make_workload(engine, args.num_prompts, args.input_len, args.output_len, None, 0)
    warm_up(engine)
    bandwidth = memory_bandwidth(engine)
    steps = timed_run(engine, workload)
    rows = step_table(steps, kv_bytes_per_token(engine), bandwidth)
    profiled_wall, kinds = kernel_table(engine, workload)
    wall = sum(s["s"] for s in steps)
    output_tokens = sum(workload.output_lens)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "wall_s": wall, "steps": rows, "kernels": kinds,
                       "profiled_wall_s": profiled_wall, "timeline": steps}, f)
    weights_s = weight_bytes(engine) / bandwidth
    print(f"\n{args.model}: {len(steps)} steps, {wall:.2f} s, {output_tokens / wall:.0f} output tok/s; "
          f"bandwidth {bandwidth / 1e9:.0f} GB/s, weights {weights_s * 1000:.2f} ms per step")
    print(f"{'steps':<16}{'count':>7}{'wall s':>9}{'ms/step':>9}{'KV floor s':>12}")
    for r in rows:
        print(f"{r['steps']:<16}{r['count']:>7}{r['wall_s']:>9.2f}{r['ms_per_step']:>9.2f}{r['kv_floor_s']:>12.2f}")
    kernel_s = sum(k["gpu_s"] for k in kinds)
    print(f"\nprofiled run: wall {profiled_wall:.2f} s, GPU kernels {kernel_s:.2f} s, idle {profiled_wall - kernel_s:.2f} s")
    print(f"{'kernels':<20}{'GPU s':>8}{'calls':>10}")
    for k in kinds:
        print(f"{k['kind']:<20}{k['gpu_s']:>8.2f}{k['calls']:>10}")


if __name__ == "__main__":
    main()
