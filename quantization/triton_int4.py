"""W4A16 on the GPU: y [M, N] = x [M, K] @ W^T (+ bias), W in int4.py's packed layout, read as it is (no repacking).

A program owns BLOCK_N weight rows (output columns) by BLOCK_M rows of x and walks K in tiles of BLOCK_K input
features. A tile's packed words (BLOCK_K / 8 per row, contiguous: coalesced, each read once) are read as eight
planes, plane j holding feature 8w + j of word w, and x's tile is split the same way, so no nibble moves between
registers. A nibble becomes an exact fp32 by one LOP3 and one add (`nibble`: ORed into the mantissa of a power of
two, then that power and the zero point subtracted): no shift per nibble, no int-to-float conversion. Words come in
runs sharing one zero and scale (a group, or the whole tile when one group covers it), loaded once per run.
Accumulation is fp32; the output is written in x's dtype.

- M = 1 (decode): a GEMV, no MMA. Products accumulate per word, scaled once per word, and are reduced once at the
  end; the next tile's loads are issued before the current tile is computed (Triton's pipeliner only takes loads
  that feed a dot). 8 rows x 1024 features per program: 4 KB of weights in flight each.
- 1 < M <= DEQUANTIZE_ABOVE_M: tensor cores, eight MMAs (K = BLOCK_K / 8) per tile with the weight rows as the first
  operand (`dot(W, x^T)`): 64 of them are the A operand of one warpgroup's wgmma, from registers, and a decode batch
  pads only its own side to 16. With one group per tile (group 128, BLOCK_K 128) q - zero (small integers, exact in
  fp16 and bf16) goes into the MMAs and the scale multiplies the tile's sums.
- Split-K: when the (N, M) tiles are too few to keep the GPU busy, SPLIT_K programs share a tile's K range and add
  fp32 partial sums atomically into a zeroed fp32 buffer, cast after (a memset and a cast more).
- Groups: contiguous (AWQ; GPTQ without act-order, whose g_idx int4.py drops at load) or gathered per feature through
  g_idx (act-order GPTQ: correct, about three times the instructions).
- Above DEQUANTIZE_ABOVE_M rows (long prefills) the weight is dequantized once by a Triton pass and multiplied by
  cuBLAS.

Block sizes come from per-shape heuristics (`tile_config`), no autotuning. Under TRITON_INTERPRET (the CPU tests)
the same heuristics apply, and the interpreter's bf16 dot (wrong in triton 3.9) is replaced by an fp32 dot of the
same bf16-rounded operands. triton is imported on first use.
"""
import functools
import importlib.util
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

# Rows of x above which the weight is dequantized once per call (0.5 byte read and 2 written per weight) and
# multiplied by cuBLAS (bf16 at ~750 TFLOP/s). The fused kernel dequantizes the whole weight again for each of its
# M / 128 row tiles; the one-pass dequantization costs about 4.5 bytes per weight (its write and cuBLAS's read) at
# 3.3 (H100) to 4.8 (H200) TB/s. With the fused kernel at a fraction f of cuBLAS's rate, the two are equal near
# M = 4.5 * 750e12 / (2 * bandwidth * (1 / f - 1)): 350 to 750 rows for f = 0.5 to 0.6. Reasoned, not measured.
DEQUANTIZE_ABOVE_M = 512


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # rows of x per program; 1: the GEMV form, no MMA
    block_n: int  # output columns (weight rows) per program
    block_k: int  # input features per inner iteration
    split_k: int  # programs sharing one tile's K range (fp32 atomic adds)
    num_warps: int
    num_stages: int


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def kernels() -> SimpleNamespace:
    # Triton's interpreter runs a kernel's source against its module's globals: the names the kernels use must be
    # module globals.
    global tl, dequantize_tile, split8, nibble, tile_loads, dequantized_plane
    import triton
    import triton.language as tl

    @triton.jit
    def dequantize_tile(qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, offs_n, n_mask, k0, K, stride_q, stride_s,
                        group_size, HAS_G_IDX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Weight rows offs_n, input features k0 .. k0 + BLOCK_K, in fp32 [BLOCK_N, BLOCK_K], in feature order."""
        offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        mask = n_mask[:, None] & (offs_w < K // 8)[None, :]
        words = tl.load(qweight_ptr + offs_n[:, None] * stride_q + offs_w[None, :], mask=mask, other=0)
        q = (words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF  # [BLOCK_N, words, 8]: feature 8w + j
        if HAS_G_IDX:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            groups = tl.reshape(tl.load(g_idx_ptr + offs_k, mask=offs_k < K, other=0), (BLOCK_K // 8, 8))
            at = offs_n[:, None, None] * stride_s + groups[None, :, :]
            mask = n_mask[:, None, None]
        else:  # a group per word (group sizes are multiples of 8)
            at = (offs_n[:, None] * stride_s + (offs_w * 8 // group_size)[None, :])[:, :, None]
            mask = mask[:, :, None]
        zero = tl.load(zeros_ptr + at, mask=mask, other=0).to(tl.int32)
        w = (q - zero).to(tl.float32) * tl.load(scales_ptr + at, mask=mask, other=0).to(tl.float32)
        return tl.reshape(w, (BLOCK_N, BLOCK_K))

    @triton.jit
    def split8(x):
        """x [..., 2, 2, 2] (the last three dims: bits 2, 1, 0 of j) -> the eight x[..., j], j = 0..7."""
        even, odd = tl.split(x)
        e0, e1 = tl.split(even)
        o0, o1 = tl.split(odd)
        x0, x4 = tl.split(e0)
        x2, x6 = tl.split(e1)
        x1, x5 = tl.split(o0)
        x3, x7 = tl.split(o1)
        return x0, x1, x2, x3, x4, x5, x6, x7

    @triton.jit
    def nibble(words, high, zero, J: tl.constexpr):
        """Nibble J of each word minus `zero`, exactly, in fp32, by one LOP3 and one add: the nibble, left where it
        is in `words` (J < 4) or `high` (words >> 12: bits 4..19 hold nibbles 4..7), ORed into the mantissa of
        2^(23 - p) (p its bit position) reads as that power plus the nibble."""
        if J < 4:
            half = words
        else:
            half = high
        p = 4 * J - 12 * (J >= 4)
        biased = ((half & (15 << p)) | ((150 - p) << 23)).to(tl.float32, bitcast=True)
        return biased - (zero + (1 << (23 - p)))

    @triton.jit
    def tile_loads(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, rows, m_mask, offs_n, n_mask, t, last, K,
                   stride_xm, stride_q, stride_s, HAS_G_IDX: tl.constexpr, GROUP_SIZE: tl.constexpr,
                   GROUP_WORDS: tl.constexpr, BLOCK_K: tl.constexpr):
        """What K tile t needs (nothing past `last`), its words grouped by scale: packed words [BLOCK_N, groups,
        GROUP_WORDS], x [rows, groups, GROUP_WORDS, 8] (feature 8w + j at [.., w, j]), and the zeros and scales
        [BLOCK_N, groups, 1] of contiguous groups or, with g_idx, the groups [groups, GROUP_WORDS, 8] (twice)."""
        GROUPS: tl.constexpr = BLOCK_K // 8 // GROUP_WORDS
        wk = t * (BLOCK_K // 8) + tl.arange(0, GROUPS)[:, None] * GROUP_WORDS + tl.arange(0, GROUP_WORDS)[None, :]
        w_mask = wk < tl.minimum(K // 8, last * (BLOCK_K // 8))
        words = tl.load(qweight_ptr + offs_n[:, None, None] * stride_q + wk[None, :, :],
                        mask=n_mask[:, None, None] & w_mask[None, :, :], other=0)
        feature = wk[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]
        x = tl.load(x_ptr + rows[:, None, None, None] * stride_xm + feature[None, :, :, :],
                    mask=m_mask[:, None, None, None] & w_mask[None, :, :, None], other=0.0)
        if HAS_G_IDX:
            zero = tl.load(g_idx_ptr + feature, mask=w_mask[:, :, None], other=0)
            scale = zero
        else:  # the group of each GROUP_WORDS words (past the end: the last tile's, unused)
            first_word = tl.minimum(t, last - 1) * (BLOCK_K // 8) + tl.arange(0, GROUPS) * GROUP_WORDS
            at = offs_n[:, None, None] * stride_s + (first_word * 8 // GROUP_SIZE)[None, :, None]
            mask = n_mask[:, None, None] & (first_word < K // 8)[None, :, None]
            zero = tl.load(zeros_ptr + at, mask=mask, other=0).to(tl.float32)
            scale = tl.load(scales_ptr + at, mask=mask, other=0).to(tl.float32)
        return words, x, zero, scale

    @triton.jit
    def dequantized_plane(words, high, zero, scale, groups, zeros_ptr, scales_ptr, offs_n, n_mask, stride_s, J,
                          HAS_G_IDX: tl.constexpr, SCALED: tl.constexpr):
        """Plane J of the tile [BLOCK_N, groups, GROUP_WORDS] in fp32: (q - zero) * scale, or q - zero alone when
        not SCALED (the caller scales the sums, one scale per group). With g_idx, each feature's group is gathered."""
        if HAS_G_IDX:
            at = offs_n[:, None, None] * stride_s + groups[J][None, :, :]
            zero = tl.load(zeros_ptr + at, mask=n_mask[:, None, None], other=0).to(tl.float32)
            scale = tl.load(scales_ptr + at, mask=n_mask[:, None, None], other=0).to(tl.float32)
        w = nibble(words, high, zero, J)
        if SCALED:
            w = w * scale
        return w

    @triton.jit
    def int4_matmul(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, bias_ptr, out_ptr, M, N, K, stride_xm,
                    stride_om, stride_q, stride_s, HAS_G_IDX: tl.constexpr, GROUP_SIZE: tl.constexpr,
                    GROUP_WORDS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, INTERPRET: tl.constexpr):
        """A K tile's packed words are read as 8 planes, plane j holding input features 8w + j; x's tile is split
        the same way (x[..., 8w + j]), so no nibble moves between registers. Words come in runs of GROUP_WORDS
        sharing one zero and scale (a group, or the whole tile when a group covers it)."""
        GROUPS: tl.constexpr = BLOCK_K // 8 // GROUP_WORDS
        ONE_GROUP: tl.constexpr = GROUPS == 1 and not HAS_G_IDX
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        rows = offs_m.to(tl.int64)
        tiles = tl.cdiv(K, BLOCK_K)
        per_split = tl.cdiv(tiles, SPLIT_K)
        first = pid_k * per_split
        last = tl.minimum(first + per_split, tiles)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        if BLOCK_M == 1:  # GEMV: sums per word, reduced once at the end; the next tile's loads issued first
            wide = tl.zeros((BLOCK_N, GROUPS, GROUP_WORDS), dtype=tl.float32)
            words, x, zero, scale = tile_loads(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, rows, m_mask,
                                               offs_n, n_mask, first, last, K, stride_xm, stride_q, stride_s,
                                               HAS_G_IDX, GROUP_SIZE, GROUP_WORDS, BLOCK_K)
            for t in range(first, last):
                words_next, x_next, zero_next, scale_next = tile_loads(
                    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, rows, m_mask, offs_n, n_mask, t + 1, last,
                    K, stride_xm, stride_q, stride_s, HAS_G_IDX, GROUP_SIZE, GROUP_WORDS, BLOCK_K)
                xs = split8(tl.reshape(x.to(tl.float32), (GROUPS, GROUP_WORDS, 2, 2, 2)))
                groups = split8(tl.reshape(zero, (GROUPS, GROUP_WORDS, 2, 2, 2))) if HAS_G_IDX else xs
                high = words >> 12
                part = tl.zeros((BLOCK_N, GROUPS, GROUP_WORDS), dtype=tl.float32)
                for j in tl.static_range(8):
                    part += dequantized_plane(words, high, zero, scale, groups, zeros_ptr, scales_ptr, offs_n,
                                              n_mask, stride_s, j, HAS_G_IDX, HAS_G_IDX) * xs[j][None, :, :]
                wide += part if HAS_G_IDX else part * scale  # a group's words share its scale
                words, x, zero, scale = words_next, x_next, zero_next, scale_next
            acc += tl.sum(tl.reshape(wide, (BLOCK_N, BLOCK_K // 8)), axis=1)[:, None]
        else:  # tensor cores, 8 MMAs of BLOCK_K / 8 per tile; triton pipelines the loads
            for t in range(first, last):
                words, x, zero, scale = tile_loads(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, rows,
                                                   m_mask, offs_n, n_mask, t, last, K, stride_xm, stride_q,
                                                   stride_s, HAS_G_IDX, GROUP_SIZE, GROUP_WORDS, BLOCK_K)
                xs = split8(tl.reshape(x, (BLOCK_M, BLOCK_K // 8, 2, 2, 2)))
                groups = split8(tl.reshape(zero, (GROUPS, GROUP_WORDS, 2, 2, 2))) if HAS_G_IDX else xs
                high = words >> 12
                part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for j in tl.static_range(8):
                    w = dequantized_plane(words, high, zero, scale, groups, zeros_ptr, scales_ptr, offs_n, n_mask,
                                          stride_s, j, HAS_G_IDX, not ONE_GROUP)
                    w = tl.reshape(w, (BLOCK_N, BLOCK_K // 8)).to(x_ptr.dtype.element_ty)
                    x_j = tl.trans(xs[j])  # [words, BLOCK_M]
                    if INTERPRET:  # the interpreter's bf16 dot is wrong: the same rounded operands in fp32
                        part = tl.dot(w.to(tl.float32), x_j.to(tl.float32), part)
                    else:
                        part = tl.dot(w, x_j, part)
                if ONE_GROUP:  # the MMAs summed q - zero (small integers, exact in fp16 and bf16): scale once
                    part = part * tl.reshape(scale, (BLOCK_N, 1))
                acc += part
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)
            acc += bias[:, None] * (pid_k == 0).to(tl.float32)
        out = out_ptr + rows[None, :] * stride_om + offs_n[:, None]
        if SPLIT_K == 1:
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])
        else:
            tl.atomic_add(out, acc, mask=n_mask[:, None] & m_mask[None, :])

    @triton.jit
    def int4_dequantize(qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, out_ptr, N, K, stride_q, stride_s, group_size,
                        HAS_G_IDX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = dequantize_tile(qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, offs_n, offs_n < N, k0, K, stride_q,
                            stride_s, group_size, HAS_G_IDX, BLOCK_N, BLOCK_K)
        tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])

    return SimpleNamespace(int4_matmul=int4_matmul, int4_dequantize=int4_dequantize)


@functools.cache
def multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def tile_config(m: int, n: int, k: int, device: torch.device) -> TileConfig:
    """Block sizes for one product, from instruction counts of the compiled kernels (sm_90) and the bytes a GPU
    must have in flight (about 18 KB per SM on an H100 to reach its bandwidth); to be tuned on the GPU."""
    if m == 1:  # 8 rows x 1024 features: 4 KB of weights per tile, the next tile's loads in flight
        block_m, block_n, block_k, warps, stages = 1, 8, min(1024, max(64, 1 << (k - 1).bit_length())), 4, 1
    elif m <= 16:  # 64 weight rows: the A operand of one warpgroup's wgmma, from registers (7 instructions per
        # weight against 12 for 32 rows through mma.sync); a group of 128 per tile: q - zero into the MMAs
        block_m, block_n, block_k, warps, stages = 16, 64, 128, 4, 4
    elif m <= 64:
        block_m, block_n, block_k, warps, stages = 32 if m <= 32 else 64, 64, 128, 4, 4
    else:  # wgmma on sm_90
        block_m, block_n, block_k, warps, stages = 128, 128, 128, 8, 3
    programs = -(-n // block_n) * -(-m // block_m)
    k_tiles = -(-k // block_k)
    # too few programs to keep the GPU busy (memory-bound up to 64 rows: two per SM): share each one's K range
    # (fp32 atomic adds; a memset and a cast more)
    wanted = multiprocessors(device) * (2 if m <= 64 else 1)
    split_k = 1
    while programs * split_k < wanted and split_k * 2 <= min(8, k_tiles // 4):
        split_k *= 2
    return TileConfig(block_m, block_n, block_k, split_k, warps, stages)


def group_words(group_size: int, block_k: int, act_order: bool) -> int:
    """Words of a K tile sharing one zero and scale: the whole tile when a group covers it, else a group's."""
    if act_order:
        return 1
    if group_size % block_k == 0:
        return block_k // 8
    return group_size // 8 if block_k % group_size == 0 else 1


def split_words_groups(k: int, groups: int, device: torch.device) -> torch.Tensor | None:
    """Contiguous groups whose size is no multiple of 8 split packed words: read them as g_idx (None otherwise)."""
    return None if (k // groups) % 8 == 0 else (torch.arange(k, device=device) // (k // groups)).to(torch.int32)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                g_idx: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                config: TileConfig | None = None) -> torch.Tensor:
    """x [..., K] (fp16 or bf16) @ W^T (+ bias) -> [..., N] in x's dtype, W [N, K] being int4.py's layout: qweight
    [N, K/8] int32, scales [N, groups], zeros [N, groups] uint8 and, for act-order, g_idx [K] int32 (without it,
    group = k // (K / groups)). `config` forces the fused kernel's blocks (else: heuristics, and above
    DEQUANTIZE_ABOVE_M rows a dequantized weight and cuBLAS)."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    if config is None and m > DEQUANTIZE_ABOVE_M:
        return F.linear(x, dequantize(qweight, scales, zeros, g_idx, x.dtype), bias)
    cfg = config or tile_config(m, n, k, x.device)
    g_idx = g_idx if g_idx is not None else split_words_groups(k, scales.shape[1], x.device)
    group_size = k // scales.shape[1] if g_idx is None else 8  # with g_idx: unused
    split = cfg.split_k > 1
    out = (torch.zeros if split else torch.empty)((m, n), dtype=torch.float32 if split else x.dtype,
                                                  device=x.device)
    grid = (-(-n // cfg.block_n), -(-m // cfg.block_m), cfg.split_k)
    kernels().int4_matmul[grid](
        rows, qweight, scales, zeros, qweight if g_idx is None else g_idx, qweight if bias is None else bias, out,
        m, n, k, rows.stride(0), out.stride(0), qweight.stride(0), scales.stride(0), HAS_G_IDX=g_idx is not None,
        GROUP_SIZE=group_size, GROUP_WORDS=group_words(group_size, cfg.block_k, g_idx is not None),
        HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k, INTERPRET=interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.to(x.dtype).view(*x.shape[:-1], n)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor:
    """The float weight [N, K] in `dtype`, in one pass (for the cuBLAS path of long prefills)."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    g_idx = g_idx if g_idx is not None else split_words_groups(k, scales.shape[1], qweight.device)
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    block_n, block_k = 32, 128
    kernels().int4_dequantize[(-(-n // block_n), -(-k // block_k))](
        qweight, scales, zeros, qweight if g_idx is None else g_idx, out, n, k, qweight.stride(0), scales.stride(0),
        k // scales.shape[1], HAS_G_IDX=g_idx is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out
