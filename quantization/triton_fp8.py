"""fp8 weights times a few rows of 16-bit activations on the GPU (W8A16): y [M, N] = x [M, K] @ (W [N, K] * scale)^T.

Decode batches of up to GEMV_MAX_ROWS rows take this kernel instead of `torch._scaled_mm`, whose per-token
activation quantization (a few small kernels per layer) and one-row fp8 GEMM made Llama-3.1-8B's batch-1 decode
slower than bf16 (7.48 against 6.20 ms per token on an H100, docs/benchmarks.md). A program owns BLOCK_N weight rows
and every row of x; it walks K in BLOCK_K steps, each weight tile read once (fp8: one byte per weight, widened in
registers) and the next one's loads issued before it is used, multiplied into all M rows of x by a broadcast product
in fp32, summed over K per step or (one row) once at the end; the row scales (and a bias) apply once at the end.
Block sizes come from `gemv_config`. triton is imported on first use; under TRITON_INTERPRET the tests run it on
the CPU.
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
    def fp8_gemv(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, m, n, k, stride_x, stride_w, stride_out,
                 HAS_BIAS: tl.constexpr, SUM_AT_END: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
        rows = tl.arange(0, BLOCK_M)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_ok, col_ok = rows < m, cols < n
        x_ptrs = x_ptr + rows[:, None] * stride_x + ks[None, :]
        w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_w + ks[None, :]
        # the next weight tile is loaded before this one is used: Triton pipelines only loads that feed a dot
        w = tl.load(w_ptrs, mask=col_ok[:, None] & (ks < k)[None, :], other=0.0)
        if SUM_AT_END:  # products kept per lane, summed over K once
            acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, k, BLOCK_K):
            w_next = tl.load(w_ptrs + BLOCK_K, mask=col_ok[:, None] & (ks < k - start - BLOCK_K)[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=row_ok[:, None] & (ks < k - start)[None, :], other=0.0).to(tl.float32)
            products = x[:, None, :] * w.to(tl.float32)[None, :, :]
            if SUM_AT_END:
                acc3 += products
            else:
                acc += tl.sum(products, axis=2)
            w = w_next
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if SUM_AT_END:
            acc = tl.sum(acc3, axis=2)
        acc = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + rows[:, None] * stride_out + cols[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    return SimpleNamespace(fp8_gemv=fp8_gemv)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # weight rows (output columns) per program
    block_k: int  # input features per step
    num_warps: int
    sum_at_end: bool  # per-lane products summed once at the end (registers: block_m * block_n * block_k)


def gemv_config(m: int, n: int, k: int) -> GemvConfig:
    """Block sizes by rows of x: to be set from benchmarks/fp8_gemv.py's sweep on the GPU."""
    block_m = next_pow2(m)
    if block_m == 1:
        return GemvConfig(8, 512, 4, True)
    return GemvConfig(16 // block_m * 2, 256, 4, False)


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
             config: GemvConfig | None = None) -> torch.Tensor:
    """x [M, K] (M <= GEMV_MAX_ROWS, fp16/bf16/fp32) @ (weight [N, K] fp8 * weight_scale [N, 1])^T (+ bias) -> [M, N]
    in x's dtype. `config` forces the blocks (else gemv_config's)."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.stride(1) == 1, "fp8 weights are row-major [N, K]"
    if x.stride(-1) != 1:
        x = x.contiguous()
    cfg = config or gemv_config(m, n, k)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    scale = weight_scale.reshape(-1).float().contiguous()
    kernels().fp8_gemv[(-(-n // cfg.block_n),)](
        x, weight, scale, bias if bias is not None else scale, out, m, n, k, x.stride(0), weight.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, SUM_AT_END=cfg.sum_at_end, BLOCK_M=next_pow2(m),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps)
    return out
