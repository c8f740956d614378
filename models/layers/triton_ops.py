"""Fused GPU kernels for the layers' elementwise work: one launch where torch makes eight or more.

RMSNorm (with the residual add), rotary embedding (of q and k together, with Qwen3's per-head norms) and
SiLU-and-multiply are memory-light but made of many small torch ops; in a decode step those launches cost more
than the math. triton is imported on first use.
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
    # Triton's interpreter runs a kernel's source against its module's globals: the names the kernels use must be
    # module globals.
    global tl, rotate_heads
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
    def rotate_heads(base, heads, stride_h, cos, sin, weight_ptr, eps, offset, NORM: tl.constexpr,
                     HALF: tl.constexpr, HALF_P2: tl.constexpr, HEADS_P2: tl.constexpr):
        """Rotate one token's heads in place (RMS-normalising each head first when NORM)."""
        h = tl.arange(0, HEADS_P2)[:, None]
        d = tl.arange(0, HALF_P2)[None, :]
        mask = (h < heads) & (d < HALF)
        first = base + h * stride_h + d
        x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
        if NORM:
            scale = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
            x1 = x1 * scale * (tl.load(weight_ptr + d, mask=d < HALF, other=0.0).to(tl.float32) + offset)
            x2 = x2 * scale * (tl.load(weight_ptr + HALF + d, mask=d < HALF, other=0.0).to(tl.float32) + offset)
        tl.store(first, (x1 * cos - x2 * sin).to(base.dtype.element_ty), mask=mask)
        tl.store(first + HALF, (x2 * cos + x1 * sin).to(base.dtype.element_ty), mask=mask)

    # positions may start anywhere in the step's upload buffer: no variant per alignment
    @triton.jit(do_not_specialize_on_alignment=["positions_ptr"])
    def qk_rotary(q_ptr, k_ptr, cos_ptr, sin_ptr, positions_ptr, q_weight_ptr, k_weight_ptr, stride_qt, stride_qh,
                  stride_kt, stride_kh, q_heads, k_heads, q_eps, k_eps, q_offset, k_offset, NORM: tl.constexpr,
                  HALF: tl.constexpr, HALF_P2: tl.constexpr, Q_HEADS_P2: tl.constexpr, K_HEADS_P2: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        position = tl.load(positions_ptr + token)
        d = tl.arange(0, HALF_P2)[None, :]
        cos = tl.load(cos_ptr + position * HALF + d, mask=d < HALF, other=0.0)
        sin = tl.load(sin_ptr + position * HALF + d, mask=d < HALF, other=0.0)
        rotate_heads(q_ptr + token * stride_qt, q_heads, stride_qh, cos, sin, q_weight_ptr, q_eps, q_offset, NORM,
                     HALF, HALF_P2, Q_HEADS_P2)
        rotate_heads(k_ptr + token * stride_kt, k_heads, stride_kh, cos, sin, k_weight_ptr, k_eps, k_offset, NORM,
                     HALF, HALF_P2, K_HEADS_P2)

    @triton.jit
    def silu_and_mul(x_ptr, out_ptr, stride_x, stride_o, size, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < size
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + size + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, (gate / (1 + tl.exp(-gate)) * up).to(out_ptr.dtype.element_ty),
                 mask=mask)

    return SimpleNamespace(rms_norm=rms_norm, qk_rotary=qk_rotary, silu_and_mul=silu_and_mul,
                           next_pow2=triton.next_power_of_2)


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


def qk_rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
               norms: tuple | None = None) -> None:
    """Rotate q [T, heads, head_dim] and k [T, kv_heads, head_dim] in place, in one launch, by the tables cos/sin
    [max_positions, head_dim / 2] at positions [T]; with `norms` (two RMSNorms), each head is normalised first."""
    tokens, q_heads, head_dim = q.shape
    q_norm, k_norm = norms or (None, None)
    (q_weight, q_eps, q_offset), (k_weight, k_eps, k_offset) = norm_args(q_norm, q), norm_args(k_norm, k)
    kern = kernels()
    kern.qk_rotary[(tokens,)](q, k, cos, sin, positions, q_weight, k_weight, q.stride(0), q.stride(1), k.stride(0),
                              k.stride(1), q_heads, k.shape[1], q_eps, k_eps, q_offset, k_offset,
                              NORM=norms is not None, HALF=head_dim // 2, HALF_P2=kern.next_pow2(head_dim // 2),
                              Q_HEADS_P2=kern.next_pow2(q_heads),
                              K_HEADS_P2=kern.next_pow2(k.shape[1]))


def norm_args(norm, placeholder: torch.Tensor) -> tuple:
    """An RMSNorm's weight, eps and offset for the kernel (a placeholder pointer and zeros without one)."""
    return (norm.weight, norm.eps, norm.offset) if norm is not None else (placeholder, 0.0, 0.0)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x [T, 2 * size] = [gate | up]."""
    tokens, size = x.shape[0], x.shape[1] // 2
    out = torch.empty((tokens, size), dtype=x.dtype, device=x.device)
    block = 1024
    kernels().silu_and_mul[(tokens, -(-size // block))](x, out, x.stride(0), out.stride(0), size, BLOCK=block)
    return out
