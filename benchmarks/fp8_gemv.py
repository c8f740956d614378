"""The W8A16 GEMV (quantization/triton_fp8.py) at Llama-3.1-8B's shapes on the GPU: every candidate config (tensor-core
forms, and at one row CUDA-core ones) at 1 and 4 rows (--rows) against bf16 cuBLAS (F.linear), the W8A8 path it
replaces (per-token quantization plus torch._scaled_mm) and the fp8 weight-read floor at the measured copy bandwidth.

    python benchmarks/fp8_gemv.py [--rows 1 4] [--json FILE]

Times are replays of a CUDA graph of the call (triton.testing.do_bench_cudagraph), as the engine's decode steps run
it: timed eagerly, a 20 us kernel measures its Python launch instead (the first sweep, on an H200, did that). The
last table is the best config per shape and row count, and gemv_config's choice."""
import argparse
import json
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from llmserve.quantization import triton_fp8
from llmserve.quantization.fp8 import quantize_rows

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K): qkv, o, gate_up, down


def bench(fn) -> float:
    return do_bench_cudagraph(fn, rep=20, return_mode="median") * 1000  # us


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / (bench(lambda: b.copy_(a)) / 1e6)


def candidates(m: int) -> list[triton_fp8.GemvConfig]:
    """Tensor-core configs, and at one row the CUDA-core form whose per-thread products (block_n x block_k /
    threads) stay in registers (more rows on CUDA cores cost 12 or more instructions a weight byte: left out)."""
    out = [triton_fp8.GemvConfig(block_n, block_k, 4, triton_fp8.MMA, stages)
           for block_n in (16, 32, 64) for block_k in (128, 256, 512) for stages in (3, 4)]
    if m == 1:
        out += [triton_fp8.GemvConfig(block_n, block_k, warps, triton_fp8.SUM_AT_END)
                for block_n in (4, 8, 16) for block_k in (256, 512, 1024) for warps in (4, 8)
                if 16 <= block_n * block_k / (32 * warps) <= 64]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    start = time.time()
    bandwidth = copy_bandwidth()
    results = {"device": torch.cuda.get_device_name(), "copy_bandwidth": bandwidth, "shapes": []}
    for n, k in SHAPES:
        torch.manual_seed(0)
        weight, scale = quantize_rows(torch.randn(n, k, device="cuda") * 0.05)
        dense = (weight.float() * scale).to(torch.bfloat16)
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            reference = x.double() @ (weight.double() * scale.double()).T
            tried = {}
            for cfg in candidates(m):
                out = triton_fp8.fp8_gemv(x, weight, scale, None, cfg)
                error = ((out.double() - reference).norm() / reference.norm()).item()
                tried[cfg] = bench(lambda: triton_fp8.fp8_gemv(x, weight, scale, None, cfg)) if error < 1e-2 \
                    else float("inf")
            chosen = triton_fp8.gemv_config(m, n, k, x.dtype)
            row = {"n": n, "k": k, "m": m, "bf16_us": bench(lambda: F.linear(x, dense)),
                   "scaled_mm_us": bench(lambda: torch._scaled_mm(*quantize_rows(x)[:1], weight.t(),
                                                                  scale_a=quantize_rows(x)[1],
                                                                  scale_b=scale.t(), out_dtype=x.dtype)),
                   "floor_us": n * k / bandwidth * 1e6, "chosen": str(chosen),
                   "chosen_us": bench(lambda: triton_fp8.fp8_gemv(x, weight, scale, None)),
                   "best": sorted(((t, str(c)) for c, t in tried.items()))[:5]}
            results["shapes"].append(row)
            print(f"N={n} K={k} M={m} t={time.time() - start:.0f}s: best {row['best'][0][0]:.1f}us "
                  f"{row['best'][0][1]}", flush=True)
            for t, c in row["best"][1:3]:
                print(f"    {t:.1f}us {c}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    print(f"\n{results['device']}, copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + written)")
    print(f"{'N x K':<14}{'M':>3}{'floor':>8}{'bf16':>8}{'W8A8':>8}{'chosen':>8}{'best':>8}{'best/floor':>11}")
    for r in results["shapes"]:
        print(f"{r['n']}x{r['k']:<9}{r['m']:>3}{r['floor_us']:>8.1f}{r['bf16_us']:>8.1f}{r['scaled_mm_us']:>8.1f}"
              f"{r['chosen_us']:>8.1f}{r['best'][0][0]:>8.1f}{r['best'][0][0] / r['floor_us']:>11.2f}")


if __name__ == "__main__":
    main()
