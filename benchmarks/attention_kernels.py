"""TRITON_ATTN's kernels on a GPU: decode bandwidth against a device copy, prefill TFLOP/s against SDPA (flash).

    python benchmarks/attention_kernels.py [--out results.json] [--sweep]

(a) decode: 64 requests x 1024-token contexts, 32 query / 8 KV heads, head size 128, bf16, block size 16: KV bytes
    read per call / time, next to torch's device-to-device copy bandwidth (bytes read + written / time).
(b) prefill: 4 x 4096-token causal sequences over an empty cache, same heads: TFLOP/s next to
    scaled_dot_product_attention on its flash backend (KV heads expanded), on the same shape.
(c) long decode: 4 requests x 32768 tokens, where the split-KV path should pay off, with and without it.
Each is checked against SDPA before it is timed; kernel times come from CUDA graphs of back-to-back calls (no
Python launch cost), eager forward() calls (cache write + attention) are reported beside them. --sweep also times
other tile configurations. A short table is printed last; --out writes everything as JSON.
"""
import argparse
import json
import math
import sys
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from llmserve.backends.triton_attn import TileConfig, TritonAttnBackend, attention, tile_config
from llmserve.interfaces import AttentionSpec, BatchLayout

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16
DECODE_SWEEP = [TileConfig(16, n, w, s) for n, w, s in [(32, 4, 4), (64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 2),
                                                        (128, 4, 3), (64, 2, 3), (128, 8, 3)]]
PREFILL_SWEEP = [TileConfig(m, n, w, s) for m, n, w, s in [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2),
                                                           (64, 64, 4, 3), (64, 128, 4, 2), (128, 32, 4, 3),
                                                           (128, 64, 4, 3), (64, 64, 4, 4)]]


def timed(fn, iters: int = 20, warmup: int = 3) -> float:
    """Seconds per call of fn, replayed from a CUDA graph of `iters` back-to-back calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return min(elapsed(graph.replay) for _ in range(5)) / iters


def elapsed(fn, iters: int = 1) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy: bytes read + written per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), iters=10)


class Setup:
    """A batch of requests with `context` cached tokens each (random block tables) and `query_len` new ones."""

    def __init__(self, batch: int, context: int, query_len: int, segments: int | None = None) -> None:
        seq_len = context + query_len
        blocks = math.ceil(seq_len / BLOCK_SIZE)
        self.spec = AttentionSpec(HEADS, KV_HEADS, HEAD_DIM, DTYPE, BLOCK_SIZE)
        self.backend = TritonAttnBackend(self.spec, torch.device("cuda"))
        self.backend.kv_segments = segments
        self.cache = torch.randn(2, batch * blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        self.tables = torch.randperm(batch * blocks).view(batch, blocks).tolist()
        positions = np.arange(context, seq_len)
        slots = [t[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for t in self.tables for p in positions]
        layout = BatchLayout(np.full(batch, query_len), np.full(batch, context), self.tables,
                             torch.tensor(slots, device="cuda"), BLOCK_SIZE, torch.device("cuda"))
        self.md = self.backend.build_metadata(layout)
        tokens = batch * query_len
        self.q = torch.randn(tokens, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        self.k = torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        self.v = torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        self.out = torch.empty_like(self.q)
        self.layer = SimpleNamespace(scale=HEAD_DIM**-0.5, sliding_window=None, logit_softcap=None)
        self.batch, self.seq_len, self.query_len = batch, seq_len, query_len

    def forward(self) -> torch.Tensor:
        return self.backend.forward(self.layer, self.q, self.k, self.v, self.cache, self.md)

    def attend(self, cfg: TileConfig | None = None) -> None:
        attention(self.q, self.cache, self.out, self.md, self.layer.scale, None, cfg)

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each request's keys and values, [batch, heads, seq_len, head_dim], KV heads expanded."""
        table = torch.tensor(self.tables, device="cuda")
        pos = torch.arange(self.seq_len, device="cuda")
        blocks, offsets = table[:, pos // BLOCK_SIZE], (pos % BLOCK_SIZE).expand(self.batch, -1)
        return tuple(self.cache[i, blocks, offsets].transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, 1)
                     for i in (0, 1))

    def sdpa_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = self.q.view(self.batch, self.query_len, HEADS, HEAD_DIM).transpose(1, 2)
        return (q, *self.keys_values())

    def check(self) -> float:
        """Max abs difference of forward() from SDPA (flash for prefill, efficient for one query)."""
        got = self.forward().view(self.batch, self.query_len, HEADS, HEAD_DIM).transpose(1, 2).float()
        q, k, v = self.sdpa_inputs()
        causal = self.query_len == self.seq_len
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self.layer.scale).float()
        return (got - want).abs().max().item()

    def kv_bytes(self) -> int:
        return 2 * self.batch * self.seq_len * KV_HEADS * HEAD_DIM * DTYPE.itemsize


def sweep(setup: Setup, configs: list[TileConfig], metric) -> list[dict]:
    rows = []
    for cfg in configs:
        try:
            seconds = timed(lambda: setup.attend(cfg))
            rows.append({"config": cfg.__dict__, "us": seconds * 1e6, **metric(seconds)})
        except Exception as e:  # e.g. a tile that needs more shared memory than there is
            rows.append({"config": cfg.__dict__, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        print(rows[-1], file=sys.stderr)
    return rows


def decode(copy_bw: float, args) -> dict:
    s = Setup(64, 1023, 1)
    error = s.check()
    seconds, eager = timed(s.attend), elapsed(s.forward, 50)
    bandwidth = s.kv_bytes() / seconds
    cfg = tile_config(HEAD_DIM, HEADS // KV_HEADS, DTYPE.itemsize, True)
    result = {"batch": 64, "context": 1024, "max_abs_error_vs_sdpa": error, "segments": s.md.num_segments,
              "config": cfg.__dict__, "kv_bytes": s.kv_bytes(), "us_per_call": seconds * 1e6,
              "us_per_forward_eager": eager * 1e6, "kv_gb_per_s": bandwidth / 1e9, "copy_gb_per_s": copy_bw / 1e9,
              "fraction_of_copy": bandwidth / copy_bw}
    if args.sweep:
        result["sweep"] = sweep(s, DECODE_SWEEP, lambda t: {"fraction_of_copy": s.kv_bytes() / t / copy_bw})
    return result


def prefill(args, batch: int = 4, seq_len: int = 4096) -> dict:
    s = Setup(batch, 0, seq_len)
    error = s.check()
    flops = 2 * batch * HEADS * seq_len * seq_len * HEAD_DIM  # causal: half of 2 matmuls of 2*S*S*D each
    seconds, eager = timed(s.attend, iters=10), elapsed(s.forward, 10)
    q, k, v = (t.contiguous() for t in s.sdpa_inputs())
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), iters=10)
    cfg = tile_config(HEAD_DIM, HEADS // KV_HEADS, DTYPE.itemsize, False)
    result = {"batch": batch, "seq_len": seq_len, "max_abs_error_vs_sdpa": error, "config": cfg.__dict__,
              "ms_per_call": seconds * 1e3, "ms_per_forward_eager": eager * 1e3, "tflops": flops / seconds / 1e12,
              "sdpa_flash_ms": sdpa * 1e3, "sdpa_flash_tflops": flops / sdpa / 1e12, "ratio_to_sdpa": sdpa / seconds}
    if args.sweep:
        result["sweep"] = sweep(s, PREFILL_SWEEP, lambda t: {"tflops": flops / t / 1e12, "ratio_to_sdpa": sdpa / t})
    return result


def long_decode(copy_bw: float, batch: int = 4, context: int = 32768) -> dict:
    result = {"batch": batch, "context": context}
    for name, segments in (("split", None), ("no_split", 1)):
        s = Setup(batch, context - 1, 1, segments)
        error = s.check()
        bandwidth = s.kv_bytes() / timed(s.attend)
        result[name] = {"segments": s.md.num_segments, "max_abs_error_vs_sdpa": error,
                        "us_per_call": s.kv_bytes() / bandwidth * 1e6, "kv_gb_per_s": bandwidth / 1e9,
                        "fraction_of_copy": bandwidth / copy_bw}
        del s  # free its cache before the next one is made
    return result


def table(r: dict) -> str:
    d, p, ld = r["decode"], r["prefill"], r["long_decode"]
    rows = [("case", "ours", "reference", "ratio", "target", "max err"),
            (f"decode B{d['batch']} ctx{d['context']} (segments {d['segments']})",
             f"{d['us_per_call']:.1f} us, {d['kv_gb_per_s']:.0f} GB/s", f"copy {d['copy_gb_per_s']:.0f} GB/s",
             f"{d['fraction_of_copy']:.2f}", ">= 0.70", f"{d['max_abs_error_vs_sdpa']:.1e}"),
            (f"prefill {p['batch']}x{p['seq_len']} causal", f"{p['ms_per_call']:.2f} ms, {p['tflops']:.0f} TFLOP/s",
             f"SDPA flash {p['sdpa_flash_tflops']:.0f} TFLOP/s", f"{p['ratio_to_sdpa']:.2f}", ">= 0.60",
             f"{p['max_abs_error_vs_sdpa']:.1e}")]
    for name in ("split", "no_split"):
        x = ld[name]
        rows.append((f"decode B{ld['batch']} ctx{ld['context']} {name} ({x['segments']})",
                     f"{x['us_per_call']:.1f} us, {x['kv_gb_per_s']:.0f} GB/s", f"copy {d['copy_gb_per_s']:.0f} GB/s",
                     f"{x['fraction_of_copy']:.2f}", "", f"{x['max_abs_error_vs_sdpa']:.1e}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the full results as JSON to this path")
    parser.add_argument("--sweep", action="store_true", help="also time other tile configurations")
    args = parser.parse_args()
    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": __import__("triton").__version__, "decode": decode(copy_bw, args), "prefill": prefill(args),
               "long_decode": long_decode(copy_bw)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    print(table(results))


if __name__ == "__main__":
    main()
