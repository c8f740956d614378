"""Sweep the W4A16 kernel's tile configs at Llama-3.1-8B's shapes on the GPU; baselines bf16 cuBLAS and
dequantize+cuBLAS (issue 16's W4A16 kernel; its tests passed on an H100, this sweep has not run yet).

    python benchmarks/int4_kernel.py [phase ...]   phases: check sweep threshold final (default: check sweep)

check: errors of the heuristic configs (group 128, with and without act-order); sweep: every candidate config at
M = 1, 16, 512 against bf16 F.linear; threshold: fused vs dequantize+cuBLAS for M = 16..4096 (sets
DEQUANTIZE_ABOVE_M); final: the heuristics at M = 1..1024. Times: triton.testing.do_bench medians (L2 flushed)."""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from llmserve.quantization import triton_int4 as ti  # noqa: E402

TC = ti.TileConfig
OUT = os.environ.get("OUT", "/tmp")
torch.backends.cuda.matmul.allow_tf32 = False
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K)
SMS = torch.cuda.get_device_properties(0).multi_processor_count
results = {"device": torch.cuda.get_device_name(), "sms": SMS}
T0 = time.time()


def make(n, k, gs=128, act_order=False):
    groups = k // gs
    q = torch.randint(0, 16, (n, k), device="cuda")
    words = torch.zeros(n, k // 8, dtype=torch.int64, device="cuda")
    for j in range(8):
        words |= q[:, j::8] << (4 * j)
    qweight = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    zeros = torch.randint(0, 17, (n, groups), dtype=torch.uint8, device="cuda")
    scales = (torch.rand(n, groups, device="cuda") * 0.02 + 0.001).to(torch.bfloat16)
    group_of = torch.arange(k, device="cuda") // gs
    g_idx = None
    if act_order:
        group_of = group_of[torch.randperm(k, device="cuda")]
        g_idx = group_of.to(torch.int32)
    weight = ((q - zeros.long()[:, group_of]).float() * scales.float()[:, group_of])
    return (qweight, scales, zeros, g_idx), weight


def err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def auto_split(cfg, m, n, k):
    programs = -(-n // cfg.block_n) * -(-m // cfg.block_m)
    wanted, split = SMS * (2 if m <= 64 else 1), 1
    while programs * split < wanted and split * 2 <= min(8, -(-k // cfg.block_k) // 4):
        split *= 2
    return TC(cfg.block_m, cfg.block_n, cfg.block_k, split, cfg.num_warps, cfg.num_stages)


def bench(fn):
    return do_bench(fn, warmup=10, rep=40, return_mode="median") * 1000  # us


def candidates(m):
    if m == 1:  # GEMV (stages unused: the kernel prefetches one tile itself)
        out = [TC(1, bn, bk, 1, w, 1) for bn in (8, 16) for bk in (512, 1024, 2048) for w in (4, 8)]
        out += [TC(1, 4, 2048, 1, 4, 1), TC(1, 32, 256, 1, 4, 1), TC(16, 64, 128, 1, 4, 4)]
    elif m == 16:
        out = [TC(16, bn, 128, 1, 4, s) for bn in (32, 64, 128) for s in (3, 4, 6)] + [TC(16, 64, 256, 1, 4, 3)]
    else:
        out = [TC(bm, bn, 128, 1, w, s) for bm, bn in ((64, 128), (128, 128), (128, 64)) for w in (4, 8)
               for s in (3, 4)]
    return out


def phase_check():
    rows = []
    for n, k in SHAPES:
        for act in (False, True):
            packed, weight = make(n, k, 128, act)
            for m in (1, 16, 512, 1024):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = x.float() @ weight.T
                out = ti.int4_linear(x, *packed)
                rows.append((n, k, act, m, err(out, ref)))
    for r in rows:
        print("check N=%d K=%d act=%d M=%d rel_err=%.2e" % r)
    results["check"] = rows


def phase_sweep(ms=(1, 16, 512)):
    sweep = {}
    for n, k in SHAPES:
        packed, weight = make(n, k)
        wb = weight.to(torch.bfloat16)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ weight.T
            key = f"N{n} K{k} M{m}"
            base = bench(lambda: F.linear(x, wb))
            deq = bench(lambda: F.linear(x, ti.dequantize(*packed, torch.bfloat16)))
            line = {"bf16": base, "dequant+cublas": deq, "configs": {}}
            cands = candidates(m)
            cands = cands + [auto_split(c, m, n, k) for c in cands if auto_split(c, m, n, k).split_k > 1]
            for c in cands:
                try:
                    out = ti.int4_linear(x, *packed, config=c)
                    e = err(out, ref)
                    t = bench(lambda: ti.int4_linear(x, *packed, config=c)) if e < 2e-2 else float("nan")
                except Exception as exc:  # noqa: BLE001
                    e, t = float("nan"), float("nan")
                    print("FAIL", key, c, repr(exc)[:300])
                line["configs"][str(tuple(c.__dict__.values()))] = (t, e)
            heur = ti.tile_config(m, n, k, x.device)
            line["heuristic"] = (str(tuple(heur.__dict__.values())), bench(lambda: ti.int4_linear(x, *packed)))
            best = sorted(line["configs"].items(), key=lambda kv: (kv[1][0] != kv[1][0], kv[1][0]))[:4]
            floor = (n * k / 2 + n * k / 128 * 3) / 3.0e12 * 1e6
            print(f"{key}: bf16 {base:.1f}us deq+cublas {deq:.1f}us heuristic {line['heuristic'][1]:.1f}us "
                  f"4-bit floor@3TB/s {floor:.1f}us t={time.time() - T0:.0f}s")
            for name, (t, e) in best:
                print(f"    {name}: {t:.1f}us err {e:.1e}")
            sweep[key] = line
            json.dump(results | {"sweep": sweep}, open(f"{OUT}/int4_sweep.json", "w"), indent=1)
    results["sweep"] = sweep


def phase_threshold():
    rows = []
    for n, k in SHAPES:
        packed, weight = make(n, k)
        wb = weight.to(torch.bfloat16)
        for m in (16, 64, 128, 256, 512, 1024, 2048, 4096):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            fused = bench(lambda: ti.int4_linear(x, *packed, config=ti.tile_config(m, n, k, x.device)))
            deq = bench(lambda: F.linear(x, ti.dequantize(*packed, torch.bfloat16)))
            base = bench(lambda: F.linear(x, wb))
            rows.append((n, k, m, fused, deq, base))
            print("thr N=%d K=%d M=%d fused %.1fus deq+cublas %.1fus bf16 %.1fus" % rows[-1])
    results["threshold"] = rows


def phase_final():
    for n, k in SHAPES:
        for act in (False, True):
            packed, weight = make(n, k, 128, act)
            wb = weight.to(torch.bfloat16)
            for m in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                e = err(ti.int4_linear(x, *packed), x.float() @ weight.T)
                t = bench(lambda: ti.int4_linear(x, *packed))
                base = bench(lambda: F.linear(x, wb))
                cfg = ti.tile_config(m, n, k, x.device)
                print(f"final N={n} K={k} act={act:d} M={m}: int4 {t:.1f}us bf16 {base:.1f}us "
                      f"({base / t:.2f}x) err {e:.1e} {tuple(cfg.__dict__.values())}")


for phase in sys.argv[1:] or ["check", "sweep"]:
    globals()[f"phase_{phase}"]()
    json.dump(results, open(f"{OUT}/int4_{phase}.json", "w"), indent=1)
print(f"done in {time.time() - T0:.0f}s")
