"""fp8 weights times a few rows of 16-bit activations on the GPU (W8A16): y [M, N] = x [M, K] @ (W [N, K] * scale)^T.

Decode batches of up to GEMV_MAX_ROWS rows take this kernel instead of `torch._scaled_mm`, whose per-token
activation quantization (a few small kernels per layer) and one-row fp8 GEMM made Llama-3.1-8B's batch-1 decode
slower than bf16 (7.48 against 6.20 ms per token on an H100, docs/benchmarks.md). A program owns BLOCK_N weight rows
and every row of x and walks K in BLOCK_K steps, each weight tile read once (fp8: one byte per weight), in one of
three forms: on tensor cores (MMA: x's rows padded to 16, both operands widened to fp16, fp32 sums; the default for
16-bit rows), or on CUDA cores with products in fp32 summed over K per step or once at the end (the default for fp32
rows); the row scales (and a bias) apply once at the end. Block sizes come from `gemv_config`. triton is imported on
first use; under TRITON_INTERPRET the tests run it on the CPU.
"""
import functools
from dataclasses import dataclass
from types import SimpleNamespace

import torch

GEMV_MAX_ROWS = 4  # rows of x up to which the kernel runs; more take torch._scaled_mm's tensor cores


@functools.cache
def kernels() -> SimpleNamespace:
    # Triton's interpreter runs a kernel's source against its module's globals: the names it uses must be globals.
    global tl
    import triton
    import triton.language as tl

    @triton.jit
    def fp8_gemv(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, m, n, k, stride_x, stride_w, stride_out, x_shrink,
                 HAS_BIAS: tl.constexpr, FORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
        rows = tl.arange(0, BLOCK_M)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_ok, col_ok = rows < m, cols < n
        x_ptrs = x_ptr + rows[:, None] * stride_x + ks[None, :]
        w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_w + ks[None, :]
        if FORM == 2:  # tensor cores: x's rows padded to 16, both operands in fp16 (fp8 widens to it in one
            # instruction), x times x_shrink (1/256, exact) so that fp16's range holds it (an argument: a constant
            # factor would be moved after the conversion by the compiler); Triton pipelines the loads
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for start in range(0, k, BLOCK_K):
                k_ok = ks < k - start
                w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float16)
                x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                acc = tl.dot((x.to(tl.float32) * x_shrink).to(tl.float16), tl.trans(w), acc)
                x_ptrs += BLOCK_K
                w_ptrs += BLOCK_K
            acc = acc / x_shrink
        else:
            # the next weight tile is loaded before this one is used: Triton pipelines only loads that feed a dot
            w = tl.load(w_ptrs, mask=col_ok[:, None] & (ks < k)[None, :], other=0.0)
            if FORM == 0:  # products kept per lane, summed over K once
                acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for start in range(0, k, BLOCK_K):
                w_next = tl.load(w_ptrs + BLOCK_K, mask=col_ok[:, None] & (ks < k - start - BLOCK_K)[None, :],
                                 other=0.0)
                x = tl.load(x_ptrs, mask=row_ok[:, None] & (ks < k - start)[None, :], other=0.0).to(tl.float32)
                products = x[:, None, :] * w.to(tl.float32)[None, :, :]
                if FORM == 0:
                    acc3 += products
                else:
                    acc += tl.sum(products, axis=2)
                w = w_next
                x_ptrs += BLOCK_K
                w_ptrs += BLOCK_K
            if FORM == 0:
                acc = tl.sum(acc3, axis=2)
        acc = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + rows[:, None] * stride_out + cols[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    return SimpleNamespace(fp8_gemv=fp8_gemv, next_pow2=triton.next_power_of_2)


SUM_AT_END, SUM_PER_STEP, MMA = 0, 1, 2  # the kernel's forms


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # weight rows (output columns) per program
    block_k: int  # input features per step
    num_warps: int
    # SUM_AT_END: per-lane products summed once at the end (registers: block_m * block_n * block_k); SUM_PER_STEP:
    # summed over each step's K; MMA: tensor cores, x's rows padded to 16 (block_n >= 16)
    form: int
    num_stages: int = 3  # MMA: Triton's pipelined loads


def gemv_config(m: int, n: int, k: int, dtype: torch.dtype) -> GemvConfig:
    """fp32 rows on CUDA cores (fp16 operands would round them). 16-bit ones on tensor cores, 256 features a step:
    5.4 instructions per weight byte in the sm_90 SASS of the loop, against 8.2 for the CUDA-core form at one row
    (12.4 at four), whose fp8 -> fp32 widening and x's layout change cost more than the bandwidth leaves (about 7.5
    per byte on an H100). Blocks from `benchmarks/fp8_gemv.py` on an H100 (2026-12-06, CUDA-graph timing, Llama-3.1-8B
    shapes): wide outputs (6144 and 28672 rows of 4096) fastest with 64 rows a program and 4 stages, long rows (14336)
    with 32 and 4 stages, 4096 x 4096 with 32 and 3; each within 7% of the best of its shape's sweep."""
    if dtype == torch.float32:
        return GemvConfig(8, 512, 4, SUM_AT_END) if m == 1 else GemvConfig(8, 256, 4, SUM_AT_END)
    if n >= 6144 and k <= 4096:
        return GemvConfig(64, 256, 4, MMA, 4)
    if k >= 8192:
        return GemvConfig(32, 256, 4, MMA, 4)
    return GemvConfig(32, 256, 4, MMA, 3)


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
             config: GemvConfig | None = None) -> torch.Tensor:
    """x [M, K] (M <= GEMV_MAX_ROWS, fp16/bf16/fp32) @ (weight [N, K] fp8 * weight_scale [N, 1])^T (+ bias) -> [M, N]
    in x's dtype. `config` forces the blocks (else gemv_config's)."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.stride(1) == 1, "fp8 weights are row-major [N, K]"
    if x.stride(-1) != 1:
        x = x.contiguous()
    cfg = config or gemv_config(m, n, k, x.dtype)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    scale = weight_scale.reshape(-1).float().contiguous()
    kern = kernels()
    kern.fp8_gemv[(-(-n // cfg.block_n),)](
        x, weight, scale, bias if bias is not None else scale, out, m, n, k, x.stride(0), weight.stride(0),
        out.stride(0), 1 / 256, HAS_BIAS=bias is not None, FORM=cfg.form,
        BLOCK_M=max(kern.next_pow2(m), 16) if cfg.form == MMA else kern.next_pow2(m), BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
