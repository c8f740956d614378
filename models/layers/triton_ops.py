"""Fused GPU kernels for the layers' elementwise work: one launch where torch makes eight or more.

RMSNorm (with the residual add) and rotary embedding are memory-light but made of many small torch
ops; in a decode step those launches cost more than the math. triton is imported on first use.
"""
import functools
import importlib.util
from types import SimpleNamespace

import torch


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def fused(x: torch.Tensor) -> bool:
    """Whether x's layer math should run as these kernels: on a GPU, with triton installed."""
    return x.is_cuda and triton_installed()


@functools.cache
def kernels() -> SimpleNamespace:
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm(x_ptr, residual_ptr, weight_ptr, out_ptr, stride_x, stride_r, stride_o, size, eps, offset,
                 HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < size
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x += tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(residual_ptr + row * stride_r + cols, x.to(residual_ptr.dtype.element_ty), mask=mask)
        normed = x * tl.rsqrt(tl.sum(x * x, axis=0) / size + eps)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
        tl.store(out_ptr + row * stride_o + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def rotary(x_ptr, cos_ptr, sin_ptr, positions_ptr, stride_t, stride_h, heads, HALF: tl.constexpr,
               HEADS_P2: tl.constexpr):
        token = tl.program_id(0)
        position = tl.load(positions_ptr + token)
        h = tl.arange(0, HEADS_P2)[:, None]
        d = tl.arange(0, HALF)[None, :]
        mask = h < heads
        cos = tl.load(cos_ptr + position * HALF + d)
        sin = tl.load(sin_ptr + position * HALF + d)
        first = x_ptr + token * stride_t + h * stride_h + d
        x1 = tl.load(first, mask=mask).to(tl.float32)
        x2 = tl.load(first + HALF, mask=mask).to(tl.float32)
        tl.store(first, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(first + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)

    return SimpleNamespace(rms_norm=rms_norm, rotary=rotary, next_pow2=triton.next_power_of_2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
             residual: torch.Tensor | None) -> torch.Tensor:
    """RMSNorm of every row of x (last dim contiguous); with `residual`, x + residual is normalised and written
    back into `residual` in place."""
    size = x.shape[-1]
    rows = x.reshape(-1, size)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    res = residual.view(-1, size) if residual is not None else rows
    k = kernels()
    k.rms_norm[(rows.shape[0],)](rows, res, weight, out, rows.stride(0), res.stride(0), out.stride(0), size, eps,
                                 offset, HAS_RESIDUAL=residual is not None, BLOCK=k.next_pow2(size))
    return out.view(x.shape)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] in place by the tables cos/sin [max_positions, head_dim / 2] at positions [T]."""
    tokens, heads, head_dim = x.shape
    k = kernels()
    k.rotary[(tokens,)](x, cos, sin, positions, x.stride(0), x.stride(1), heads, HALF=head_dim // 2,
                        HEADS_P2=k.next_pow2(heads))
    return x
