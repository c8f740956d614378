"""Instruction counts of the fp8 kernels' inner loops in sm_90 SASS, compiled without a GPU (Triton's own ptxas and
cuobjdump): TRITON_ATTN's decode tile loop over a bf16 and an fp8 cache, and the fp8 GEMV's forms. A memory-bound
loop has about 7.5 lane-instructions per byte to spend on an H100 (4 warp-instructions a clock per SM against about
17 bytes a clock per SM of HBM); a loop above that is bound by issue, not by bandwidth.

    python benchmarks/sass_loops.py
"""
import collections
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from llmserve.backends import triton_attn  # noqa: E402
from llmserve.quantization import triton_fp8  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
OP = re.compile(r"/\*([0-9a-f]{4,5})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")


def compiled(fn, signature: dict, constants: dict, aligned: list[int], **options):
    signature = signature | {name: "constexpr" for name in constants}
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    return triton.compile(ASTSource(fn, signature, constants, attrs), target=TARGET, options=options)


def largest_loop(kernel) -> tuple[int, collections.Counter]:
    """The instructions of the largest loop (a backward branch's span), by opcode."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True).stdout
    lines = [(int(m.group(1), 16), m.group(2), line) for line in sass.splitlines() if (m := OP.search(line))]
    spans = [(int(b.group(1), 16), addr) for addr, _, line in lines
             if (b := re.search(r"BRA (?:`\(.*?\))?\s*0x([0-9a-f]+)", line)) and int(b.group(1), 16) < addr]
    start, end = max(spans, key=lambda s: s[1] - s[0])
    ops = collections.Counter(op for addr, op, _ in lines if start <= addr <= end)
    return sum(ops.values()), ops


def attention(cache: str, tile_n: int):
    names = ["stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_c", "stride_cb", "stride_ct", "stride_ch",
             "stride_table"]
    signature = {"q_ptr": "*bf16", "cache_ptr": f"*{cache}", "out_ptr": "*bf16", "partial_ptr": "*fp32",
                 "ml_ptr": "*fp32", "qsl_ptr": "*i32", "seq_lens_ptr": "*i32", "table_ptr": "*i32",
                 "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "sinks_ptr": "*bf16", "num_reqs": "i32",
                 "qk_scale": "fp32", "window": "i32", "softcap": "fp32", "unit": "fp32"} | {n: "i32" for n in names}
    constants = dict(NUM_HEADS=16, GROUP=2, HEAD_DIM=128, HEAD_P2=128, BLOCK_SIZE=16, BLOCK_M=16, BLOCK_Q=8,
                     TILE_N=tile_n, SEGMENTS=1, SLIDING=False, SOFTCAP=False, SCALED=cache != "bf16", SINKS=False,
                     PRECISION=None, INTERPRET=False)
    return compiled(triton_attn.kernels().attention, signature, constants, [0, 1, 2, 3, 4, *range(16, 25)],
                    num_warps=4, num_stages=3)


def gemv(block_m: int, cfg: triton_fp8.GemvConfig):
    signature = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": "*bf16",
                 "m": "i32", "n": "i32", "k": "i32", "stride_x": "i32", "stride_w": "i32", "stride_out": "i32",
                 "x_shrink": "fp32"}
    constants = dict(HAS_BIAS=False, FORM=cfg.form, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
    return compiled(triton_fp8.kernels().fp8_gemv, signature, constants, [0, 1, 2, 3, 4, 7, 8, 9, 10],
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def main() -> None:
    print("TRITON_ATTN decode (16 rows, 2 real; head size 128; 4 warps): the unmasked tile loop")
    for cache in ("bf16", "fp8e4nv"):
        for tile_n in (64, 128):
            size, ops = largest_loop(attention(cache, tile_n))
            per_byte = size * 128 / (tile_n * 128 * 2 * (1 if cache != "bf16" else 2))
            print(f"  {cache:8} tile {tile_n:3}: {size:5} instructions a thread, {per_byte:.2f} a byte | "
                  + ", ".join(f"{o}:{n}" for o, n in ops.most_common(6)))
    print("fp8 GEMV (4 warps unless named): the K loop")
    forms = {triton_fp8.SUM_AT_END: "CUDA cores, summed at the end", triton_fp8.SUM_PER_STEP: "CUDA cores, per step",
             triton_fp8.MMA: "tensor cores"}
    for rows, cfg in [(1, triton_fp8.GemvConfig(8, 512, 4, triton_fp8.SUM_AT_END)),
                      (4, triton_fp8.GemvConfig(8, 256, 4, triton_fp8.SUM_AT_END)),
                      (4, triton_fp8.GemvConfig(8, 256, 4, triton_fp8.SUM_PER_STEP)),
                      (16, triton_fp8.GemvConfig(16, 256, 4, triton_fp8.MMA)),
                      (16, triton_fp8.GemvConfig(32, 256, 4, triton_fp8.MMA)),
                      (16, triton_fp8.GemvConfig(64, 256, 4, triton_fp8.MMA))]:
        size, ops = largest_loop(gemv(rows, cfg))
        per_byte = size * 32 * cfg.num_warps / (cfg.block_n * cfg.block_k)
        print(f"  {rows:2} rows, {cfg.block_n:2} x {cfg.block_k} ({forms[cfg.form]}): {size:4} instructions a "
              f"thread, {per_byte:.2f} a weight byte | " + ", ".join(f"{o}:{n}" for o, n in ops.most_common(5)))


if __name__ == "__main__":
    main()
