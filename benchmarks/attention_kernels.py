"""Every GPU attention backend side by side, one run: decode against the device's copy bandwidth, prefill in TFLOP/s.

    python benchmarks/attention_kernels.py [--backends TRITON_ATTN,FLASHINFER,FLASH_ATTN] [--out results.json]
        [--end-to-end benchmarks/models/Qwen3-0.6B] [--kv-cache-dtype fp8]

Shapes: 32 query / 8 KV heads, head size 128, bf16, block size 16 (--block-size), random block tables.
  decode B64 x 1k, decode B16 x 8k, decode B4 x 32k: KV bytes read per call / time, as a fraction of torch's
      device-to-device copy bandwidth (bytes read + written / time), the practical limit of a memory-bound kernel;
  prefill 4 x 4k causal over an empty cache: TFLOP/s (causal: half of the two matmuls), beside torch's SDPA on its
      flash backend on the same shape;
  mixed: 4 prefill chunks of 512 tokens after 1536 cached ones beside 60 decodes at 2k.
Each backend's forward() (the cache write and attention, as a model layer calls it) runs on the same inputs, is
checked against the fp32 reference of the conformance kit, then timed from a CUDA graph of back-to-back calls (eager
calls where a backend's step cannot be captured; the table says which). Per-step planning (build_metadata, shared
by all layers) is not in the time. With --kv-cache-dtype fp8 the cache holds fp8 with a scale for K and one for V
(the bytes read count one byte a value; backends without fp8 are refused). --end-to-end also runs the nano-vllm workload (`llm bench throughput`, 256
requests, 100..1024 tokens in and out, dummy weights, CUDA graphs) with each backend, each in its own process.
A short table is printed last; --out writes everything as JSON.
"""
import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from llmserve.interfaces import AttentionSpec, BatchLayout
from llmserve.plugins.conformance import reference
from llmserve.plugins.manager import registry

HEADS, KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16
CASES = {  # name -> requests as (cached tokens, new tokens)
    "decode B64 x 1k": [(1023, 1)] * 64,
    "decode B16 x 8k": [(8191, 1)] * 16,
    "decode B4 x 32k": [(32767, 1)] * 4,
    "prefill 4 x 4k causal": [(0, 4096)] * 4,
    "mixed 4 x 512 chunks + 60 decodes": [(1536, 512)] * 4 + [(2047, 1)] * 60,
}


def elapsed(fn, iters: int = 1) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def timed(fn, iters: int = 20) -> tuple[float, str]:
    """Seconds per call, replayed from a CUDA graph of `iters` calls; eager timing when the call cannot be captured."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        return min(elapsed(graph.replay) for _ in range(5)) / iters, "graph"
    except Exception:  # e.g. a library that synchronizes inside the call
        torch.cuda.synchronize()
        return min(elapsed(fn, iters) for _ in range(3)), "eager"


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """A copy by the SMs (an elementwise kernel, as attention reads memory; a plain copy_ may go to the DMA engines,
    which are slower): bytes read + written per second."""
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(20):
        torch.neg(src, out=dst)
    return 2 * nbytes / timed(lambda: torch.neg(src, out=dst), iters=10)[0]


class Batch:
    """One step's inputs: a random cache, random block tables, the new tokens' q/k/v as views of one projection."""

    def __init__(self, requests: list[tuple[int, int]], block_size: int, cache_dtype: torch.dtype = DTYPE) -> None:
        self.requests, self.block_size, self.cache_dtype = requests, block_size, cache_dtype
        blocks = [math.ceil((c + n) / block_size) for c, n in requests]
        values = torch.randn(2, sum(blocks), block_size, KV_HEADS, HEAD_DIM, device="cuda")
        self.scales = (values.abs().amax(dim=(1, 2, 3, 4)) / torch.finfo(cache_dtype).max).reshape(2, 1)
        scaled = cache_dtype != DTYPE
        self.cache = (values / self.scales.view(2, 1, 1, 1, 1)).to(cache_dtype) if scaled else values.to(DTYPE)
        pool = torch.randperm(sum(blocks)).tolist()
        self.tables = [pool[sum(blocks[:i]):sum(blocks[:i + 1])] for i in range(len(blocks))]
        slots = [t[p // block_size] * block_size + p % block_size
                 for (c, n), t in zip(requests, self.tables) for p in range(c, c + n)]
        self.layout = BatchLayout(np.array([n for _, n in requests]), np.array([c for c, _ in requests]), self.tables,
                                  torch.tensor(slots, device="cuda"), block_size, torch.device("cuda"))
        qkv = torch.randn(len(slots), HEADS + 2 * KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        self.q, self.k, self.v = qkv.split([HEADS, KV_HEADS, KV_HEADS], dim=1)
        self.layer = SimpleNamespace(layer_index=0, scale=HEAD_DIM**-0.5, sliding_window=None, logit_softcap=None,
                                     sinks=None, k_scale=self.scales[0], v_scale=self.scales[1])

    def kv_bytes(self) -> int:
        return 2 * sum(c + n for c, n in self.requests) * KV_HEADS * HEAD_DIM * self.cache_dtype.itemsize

    def flops(self) -> int:  # two matmuls over the keys each query sees
        return sum(4 * HEADS * HEAD_DIM * (n * c + n * (n + 1) // 2) for c, n in self.requests)

    def max_error(self, out: torch.Tensor) -> float:
        cache = self.cache.float() * self.scales.view(2, 1, 1, 1, 1) if self.cache_dtype != DTYPE else self.cache
        error, start = 0.0, 0
        for i, (c, n) in enumerate(self.requests):  # one request at a time keeps the fp32 reference small
            rows = slice(start, start + n)
            want = reference(self.q[rows], self.k[rows], self.v[rows], cache, [self.tables[i]], [(c, n)],
                             self.layer.scale, None)
            error = max(error, (out[rows].float() - want).abs().max().item())
            start += n
        return error


def run_backend(name: str, batch: Batch) -> dict:
    backend_cls = registry().of("attention_backend")[name].load()
    spec = AttentionSpec(HEADS, KV_HEADS, HEAD_DIM, DTYPE, batch.block_size,
                         kv_cache_dtype=None if batch.cache_dtype == DTYPE else batch.cache_dtype)
    reasons = backend_cls.why_unsupported(spec, "cuda")
    if reasons:
        return {"refused": "; ".join(reasons)}
    backend = backend_cls(spec, torch.device("cuda"))
    metadata = backend.build_metadata(batch.layout)

    def forward():
        return backend.forward(batch.layer, batch.q, batch.k, batch.v, batch.cache, metadata)

    error = batch.max_error(forward())  # the reference reads the cache after the write: same keys either way
    seconds, how = timed(forward, iters=10 if batch.flops() > 1e12 else 20)
    result = {"us": seconds * 1e6, "timing": how, "max_abs_error": error,
              "kv_gb_per_s": batch.kv_bytes() / seconds / 1e9, "tflops": batch.flops() / seconds / 1e12}
    del backend, metadata
    return result


def sdpa_prefill(batch: Batch) -> dict:
    n = batch.requests[0][1]
    q = batch.q.reshape(len(batch.requests), n, HEADS, HEAD_DIM).transpose(1, 2).contiguous()
    k = torch.randn(len(batch.requests), HEADS, n, HEAD_DIM, device="cuda", dtype=DTYPE)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        seconds, _ = timed(lambda: F.scaled_dot_product_attention(q, k, k, is_causal=True), iters=10)
    return {"us": seconds * 1e6, "tflops": batch.flops() / seconds / 1e12}


def end_to_end(model: str, backends: list[str], block_size: int) -> dict:
    results = {}
    for name in backends:
        out = Path(tempfile.mkdtemp()) / "result.json"
        command = [sys.executable, "-m", "llmserve.cli", "bench", "throughput", "--model", model, "--load-format",
                   "dummy", "--skip-tokenizer-init", "--dtype", "bfloat16", "--num-prompts", "256", "--input-len",
                   "100:1024", "--output-len", "100:1024", "--max-num-seqs", "256", "--attention-backend", name,
                   "--block-size", str(block_size),
                   "--output-json", str(out), "--log-level", "warning"]
        done = subprocess.run(command, capture_output=True, text=True)
        results[name] = json.loads(out.read_text()) if done.returncode == 0 else {"error": done.stderr[-500:]}
        print(name, results[name], file=sys.stderr)
    return results


def table(results: dict) -> str:
    names = results["backends"]
    header = ["case", *names, "SDPA flash", "FLASH_ATTN / best"]
    rows = [header]
    for case, by_backend in results["cases"].items():
        prefill = case.startswith("prefill")
        decode = case.startswith("decode")

        def cell(r: dict) -> str:
            if "refused" in r or "error" in r:
                return "refused" if "refused" in r else "error"
            figure = (f"{r['tflops']:.0f} TFLOP/s" if prefill else
                      f"{r['kv_gb_per_s'] / results['copy_gb_per_s']:.2f} of copy" if decode else "")
            return f"{r['us']:.0f} us {figure}".strip() + ("" if r["timing"] == "graph" else " (eager)")

        times = {n: r["us"] for n, r in by_backend.items() if "us" in r}
        ratio = (f"{min(times.values()) / times['FLASH_ATTN']:.2f}" if "FLASH_ATTN" in times else "")
        sdpa = results.get("sdpa_prefill") if prefill else None
        rows.append([case, *(cell(by_backend[n]) for n in names),
                     f"{sdpa['us']:.0f} us {sdpa['tflops']:.0f} TFLOP/s" if sdpa else "", ratio])
    if "end_to_end" in results:  # output tokens per second: higher is better
        speed = {n: r["output_tokens_per_s"] for n, r in results["end_to_end"].items() if "output_tokens_per_s" in r}
        rows.append(["nano-vllm workload, output tok/s", *(f"{speed[n]:.0f}" if n in speed else "error" for n in names),
                     "", f"{speed['FLASH_ATTN'] / max(speed.values()):.2f}" if "FLASH_ATTN" in speed else ""])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([f"copy bandwidth {results['copy_gb_per_s']:.0f} GB/s (read + written)", *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="TRITON_ATTN,FLASHINFER,FLASH_ATTN")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--end-to-end", metavar="MODEL", help="also run the nano-vllm workload with each backend")
    parser.add_argument("--out", help="write the full results as JSON to this path")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    args = parser.parse_args()
    cache_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else DTYPE
    torch.manual_seed(0)
    names = args.backends.split(",")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "block_size": args.block_size,
               "kv_cache_dtype": args.kv_cache_dtype,
               "backends": names, "cases": {}}
    first_copy = copy_bandwidth()
    for case, requests in CASES.items():
        if args.cases and case not in args.cases.split(","):
            continue
        batch = Batch(requests, args.block_size, cache_dtype)
        results["cases"][case] = {}
        for name in names:
            try:
                results["cases"][case][name] = run_backend(name, batch)
            except Exception as e:  # one backend's failure is a cell of the table, not the end of the run
                results["cases"][case][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(case, name, results["cases"][case][name], file=sys.stderr)
        if case.startswith("prefill"):
            results["sdpa_prefill"] = sdpa_prefill(batch)
        del batch
        torch.cuda.empty_cache()
    results["copy_gb_per_s"] = max(first_copy, copy_bandwidth()) / 1e9  # the first may run before the clocks rise
    if args.end_to_end:
        results["end_to_end"] = end_to_end(args.end_to_end, names, args.block_size)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
