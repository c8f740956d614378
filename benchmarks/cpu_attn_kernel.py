"""CPU_ATTN's decode kernel against TORCH_SDPA's decode path, one layer's forward() at a few shapes, on this CPU.

    python benchmarks/cpu_attn_kernel.py [--threads 2] [--hot] [--heads 9 --kv-heads 3 --head-dim 64]
    python benchmarks/cpu_attn_kernel.py --query-lens 2 4 8 16 32   # short prefill chunks over a cached prefix

Each case is a decode-only step (every row one new token after `keys - 1` cached ones, block size 16, block tables
drawn from a shuffled pool) through each backend's forward(), as a model layer calls it (the cache write of the new
tokens included; per-step metadata is built once, outside the time). By default the calls cycle over enough layers'
caches (>= 256 MiB of K/V) that every call reads its K/V from DRAM, as in a model with many layers; --hot repeats
one layer, whose K/V may then sit in the L3 cache. Times are medians of several calls after a warm-up; GB/s is the
K/V bytes of the visible keys read per call over the time. The first line gives the CPU's SIMD flags and the
bandwidth of a plain read of a large tensor (torch.sum, same threads), the practical limit of a memory-bound kernel.
--query-lens: each row instead has that many new tokens after its cached ones (a prefill chunk over a cached prefix),
through CPU_ATTN's kernel (one kernel row per new token) against TORCH_SDPA's padded matmuls.
"""
import argparse
import itertools
import math
import re
import statistics
import subprocess
import time
from types import SimpleNamespace

import numpy as np
import torch

from llmserve.backends.cpu_attn import CpuAttnBackend, kernel
from llmserve.backends.torch_sdpa import TorchSdpaBackend
from llmserve.interfaces import AttentionSpec, BatchLayout

SHAPES = [(64, 400), (8, 2048), (1, 4096), (32, 1024)]  # (decode rows, keys each)
DTYPES = [torch.float32, torch.bfloat16]
COLD_BYTES = 256 << 20


def simd_flags() -> str:
    try:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        flags = next(line for line in flags.splitlines() if line.startswith("Flags:")).split()[1:]
    except Exception:  # no lscpu: /proc/cpuinfo
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split()
    keep = [f for f in flags if re.fullmatch(r"avx2|fma|f16c|avx512\w*|amx\w*|avx_vnni\w*", f)]
    return " ".join(keep) or "(no avx2/avx512/amx)"


def median_seconds(fn, calls: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth() -> float:
    x = torch.ones(COLD_BYTES // 4 * 2)
    return x.numel() * 4 / median_seconds(lambda: x.sum(), 10, 2) / 1e9


def case(rows: int, keys: int, dtype: torch.dtype, args, query_len: int = 1) -> dict:
    heads, kv_heads, head_dim, block_size = args.heads, args.kv_heads, args.head_dim, 16
    blocks_per_row = math.ceil(keys / block_size)
    num_blocks = rows * blocks_per_row + 3
    layer_bytes = 2 * num_blocks * block_size * kv_heads * head_dim * dtype.itemsize
    layers = 1 if args.hot else max(2, math.ceil(COLD_BYTES / layer_bytes))
    pool = torch.randperm(num_blocks).tolist()
    tables = [pool[i * blocks_per_row:(i + 1) * blocks_per_row] for i in range(rows)]
    slots = [t[p // block_size] * block_size + p % block_size for t in tables for p in range(keys - query_len, keys)]
    layout = BatchLayout(np.full(rows, query_len, dtype=np.int64), np.full(rows, keys - query_len, dtype=np.int64),
                         tables, torch.tensor(slots), block_size, torch.device("cpu"))
    caches = [torch.randn(2, num_blocks, block_size, kv_heads, head_dim).to(dtype) for _ in range(layers)]
    qkv = torch.randn(rows * query_len, heads + 2 * kv_heads, head_dim).to(dtype)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    layer = SimpleNamespace(layer_index=0, scale=head_dim**-0.5, sliding_window=None, logit_softcap=None, sinks=None)
    spec = AttentionSpec(heads, kv_heads, head_dim, dtype, block_size)
    kv_read = rows * keys * kv_heads * head_dim * 2 * dtype.itemsize
    result = dict(rows=rows, keys=keys, dtype=str(dtype).removeprefix("torch."), layers=layers, kv_mb=kv_read / 1e6)
    outs = {}
    for name, cls in (("sdpa", TorchSdpaBackend), ("cpu_attn", CpuAttnBackend)):
        backend = cls(spec, torch.device("cpu"))
        backend.max_kernel_query = query_len
        metadata = backend.build_metadata(layout)
        turn = iter(range(1 << 62))
        call = lambda: backend.forward(layer, q, k, v, caches[next(turn) % layers], metadata)
        outs[name] = backend.forward(layer, q, k, v, caches[0], metadata)
        seconds = median_seconds(call, max(args.calls, 2 * layers), layers + 2)
        result[name] = seconds
    torch.testing.assert_close(outs["cpu_attn"].float(), outs["sdpa"].float(),
                               atol=2e-2 if dtype != torch.float32 else 2e-4, rtol=2e-2)
    result["gbps"] = kv_read / result["cpu_attn"] / 1e9
    result["sdpa_gbps"] = kv_read / result["sdpa"] / 1e9
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hot", action="store_true", help="one layer's cache, called again and again")
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--query-lens", type=int, nargs="+", default=[1], help="new tokens per row (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if isinstance(kernel(), Exception):
        raise SystemExit(f"CPU_ATTN's kernel did not build: {kernel()}")
    path = getattr(kernel(), "isa", lambda: "?")()  # which of the kernel's code paths this build took
    print(f"CPU flags: {simd_flags()}; kernel path: {path}; {args.threads} threads; torch {torch.__version__}; "
          f"{'hot (one layer)' if args.hot else 'cold (K/V from DRAM, layers cycled)'}; "
          f"heads {args.heads}/{args.kv_heads}, head_dim {args.head_dim}, block 16")
    print(f"plain read bandwidth (torch.sum of 512 MiB fp32): {read_bandwidth():.1f} GB/s")
    header = (f"{'q':>3} {'rows x keys':>12} {'dtype':>8} {'K/V MB':>7} {'SDPA ms':>8} {'GB/s':>6} {'CPU_ATTN ms':>11} "
              f"{'GB/s':>6} {'speedup':>7}")
    print(header)
    print("-" * len(header))
    for query_len, (rows, keys), dtype in itertools.product(args.query_lens, SHAPES, DTYPES):
        r = case(rows, keys, dtype, args, query_len)
        print(f"{query_len:>3} {f'{rows} x {keys}':>12} {r['dtype']:>8} {r['kv_mb']:7.1f} {r['sdpa'] * 1e3:8.3f} "
              f"{r['sdpa_gbps']:6.1f} {r['cpu_attn'] * 1e3:11.3f} {r['gbps']:6.1f} "
              f"{r['sdpa'] / r['cpu_attn']:6.2f}x", flush=True)


if __name__ == "__main__":
    main()
