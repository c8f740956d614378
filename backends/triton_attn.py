"""TRITON_ATTN: our own Triton kernels over the paged cache.

Three kernels: one writes the step's new K/V into the cache through slot_mapping; one unified kernel attends for
a mixed batch (prefill chunks over cached prefixes and decode rows alike), a program per (query tile of one
request, KV head, KV segment); a reduce kernel merges the segments when the KV sequence is split over several
programs (long decodes that would not fill the GPU otherwise).

A program's rows are BLOCK_Q query tokens x the query heads sharing its KV head, so each K/V tile is loaded once
for all of them. Programs of the first grid axis map to (request, tile) by a binary search over query_start_loc:
request i owns slots query_start_loc[i] // BLOCK_Q + i onwards, which bounds the grid by T // BLOCK_Q + B and
keeps it a function of padded shapes only (CUDA graphs); spare slots and empty requests exit at once.

triton is imported when the kernels are first needed, never on import: listing the backends must not import it.
"""
import functools
import itertools
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from llmserve.interfaces import AttentionBackend, BatchLayout
from llmserve.plugins import hookimpl

LOG2E = 1.4426950408889634
MAX_SEGMENTS = 16
MIN_SEGMENT_KEYS = 512  # a split-KV segment should have at least this many keys to pay for the reduce


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per program: query tokens x the query heads of one KV head
    tile_n: int  # keys per inner iteration
    num_warps: int
    num_stages: int


@dataclass
class TritonAttnMetadata:
    slot_mapping: torch.Tensor  # [T] int64, negative: skip
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32; num_computed = seq_lens - query lengths
    block_table: torch.Tensor  # [B, max_blocks] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    num_segments: int  # KV segments per query tile (power of two); 1: no split, no reduce
    buffer: torch.Tensor | None = None  # the device buffer the three tensors above are views of
    partial_out: torch.Tensor | None = None  # [T, heads, segments, head_dim] fp32, shared by the layers
    partial_ml: torch.Tensor | None = None  # [T, heads, segments, 2] fp32: running max (log2 domain) and sum


@functools.cache
def kernels() -> SimpleNamespace:
    # Triton's interpreter runs a kernel's source against its module's globals (not this function's scope):
    # the names the kernels use must be module globals.
    global tl, dot, attend_tile, attend_range, quantize, round_to_e4m3
    import triton
    import triton.language as tl

    @triton.jit
    def round_to_e4m3(y):
        """y on the e4m3 grid, rounded to nearest even by one fp32 add: the interpreter's own fp32 -> fp8 conversion
        drops the carry of a mantissa that rounds up into the next power of two (127.4 becomes 64, not 128), but
        converts values already on the grid exactly. Compiled kernels convert in hardware (round to nearest even)."""
        bits = y.to(tl.int32, bitcast=True)
        exponent = tl.maximum((bits >> 23) & 0xFF, 127 - 6)  # e4m3's subnormals keep the spacing of its 2^-6 binade
        magic = (((exponent + 20) << 23) | (1 << 22)).to(tl.float32, bitcast=True)  # 1.5 * 2^(exponent + 20)
        return (y + magic) - magic

    @triton.jit
    def quantize(x, scale, FP8_MAX: tl.constexpr, INTERPRET: tl.constexpr):
        y = tl.minimum(tl.maximum(tl.math.div_rn(x.to(tl.float32), scale), -FP8_MAX), FP8_MAX)  # IEEE, as torch's
        if INTERPRET:
            y = round_to_e4m3(y)
        return y

    @triton.jit(do_not_specialize_on_alignment=["k_scale_ptr", "v_scale_ptr"])  # one-number loads
    def write_kv(k_ptr, v_ptr, cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr, stride_kt, stride_kh, stride_vt,
                 stride_vh, stride_c, stride_cb, stride_ct, stride_ch,
                 KV_HEADS: tl.constexpr, HEADS_P2: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_P2: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, SCALED: tl.constexpr, FP8_MAX: tl.constexpr, INTERPRET: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + token)
        if slot < 0:
            return
        heads = tl.arange(0, HEADS_P2)[:, None]
        d = tl.arange(0, HEAD_P2)[None, :]
        mask = (heads < KV_HEADS) & (d < HEAD_DIM)
        dst = cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct + heads * stride_ch + d
        k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + d, mask=mask)
        v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + d, mask=mask)
        if SCALED:  # stored = clamp(x / scale) in the cache's fp8
            k = quantize(k, tl.load(k_scale_ptr), FP8_MAX, INTERPRET)
            v = quantize(v, tl.load(v_scale_ptr), FP8_MAX, INTERPRET)
        tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + stride_c, v.to(cache_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def dot(a, b, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
        if INTERPRET:  # the interpreter would multiply bf16 values as their raw 16-bit integers
            c = tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            c = tl.dot(a, b, input_precision=PRECISION)
        return c

    @triton.jit
    def attend_tile(acc, l_i, m_i, q, k_base, v_base, table_row, start, kv_end, q_pos, qk_scale, window, softcap,
                    unit, stride_cb, stride_ct, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
                    HEAD_DIM: tl.constexpr, HEAD_P2: tl.constexpr, MASKED: tl.constexpr, SLIDING: tl.constexpr,
                    SOFTCAP: tl.constexpr, SCALED: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
        """One online-softmax step over keys start:start+TILE_N; MASKED applies causality, window, sequence end."""
        key = start + tl.arange(0, TILE_N)
        d = tl.arange(0, HEAD_P2)[None, :]  # a head size that is no power of two is padded with zeros
        if MASKED:
            in_seq = key < kv_end
            block = tl.load(table_row + key // BLOCK_SIZE, mask=in_seq, other=0)
        else:
            block = tl.load(table_row + key // BLOCK_SIZE)
        offset = (block.to(tl.int64) * stride_cb + (key % BLOCK_SIZE) * stride_ct)[:, None] + d
        if MASKED:
            k = tl.load(k_base + offset, mask=in_seq[:, None] & (d < HEAD_DIM), other=0.0)
        elif HEAD_P2 != HEAD_DIM:
            k = tl.load(k_base + offset, mask=d < HEAD_DIM, other=0.0)
        else:
            k = tl.load(k_base + offset)
        k = k.to(q.dtype)  # an fp8 cache widens exactly; its scale is in qk_scale
        s = dot(q, tl.trans(k), PRECISION, INTERPRET) * qk_scale
        if SOFTCAP:  # qk_scale is scale / cap here; tanh(x) = 1 - 2 / (e^2x + 1), times cap in the log2 domain
            s = (1.0 - 2.0 / (tl.exp2(s * (2.0 * 1.4426950408889634)) + 1.0)) * softcap
        if MASKED:
            visible = key[None, :] <= q_pos[:, None]
            if SLIDING:
                visible = visible & (key[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_base + offset, mask=in_seq[:, None] & (d < HEAD_DIM), other=0.0)
        elif HEAD_P2 != HEAD_DIM:
            v = tl.load(v_base + offset, mask=d < HEAD_DIM, other=0.0)
        else:
            v = tl.load(v_base + offset)
        if SCALED:  # times a runtime 1 (one packed multiply): arithmetic between the load and the dot keeps Triton
            # from reading the fp8 tile transposed from shared memory a byte at a time (LDS.U8); widened in registers,
            # it goes back through ldmatrix in 16 bits. The scale multiplies the finished sum.
            v = v.to(q.dtype) * unit
        else:
            v = v.to(q.dtype)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, INTERPRET)
        return acc, l_i, m_new

    @triton.jit
    def attend_range(acc, l_i, m_i, q, k_base, v_base, table_row, lo, hi, kv_end, q_pos, qk_scale, window, softcap,
                     unit, stride_cb, stride_ct, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
                     HEAD_DIM: tl.constexpr, HEAD_P2: tl.constexpr, MASKED: tl.constexpr, SLIDING: tl.constexpr,
                     SOFTCAP: tl.constexpr, SCALED: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
        if INTERPRET:  # the interpreter's scalars are 1-element arrays, which NumPy 2 refuses as range() bounds
            start = lo
            while start < hi:
                acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, k_base, v_base, table_row, start, kv_end, q_pos,
                                            qk_scale, window, softcap, unit, stride_cb, stride_ct, BLOCK_SIZE,
                                            TILE_N, HEAD_DIM, HEAD_P2, MASKED, SLIDING, SOFTCAP, SCALED, PRECISION,
                                            INTERPRET)
                start += TILE_N
        else:
            for start in range(lo, hi, TILE_N):
                acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, k_base, v_base, table_row, start, kv_end, q_pos,
                                            qk_scale, window, softcap, unit, stride_cb, stride_ct, BLOCK_SIZE,
                                            TILE_N, HEAD_DIM, HEAD_P2, MASKED, SLIDING, SOFTCAP, SCALED, PRECISION,
                                            INTERPRET)
        return acc, l_i, m_i

    # The batch's size and where its metadata starts in the upload buffer vary every step: no compiled variant
    # per value (Triton would specialise them on == 1, on divisibility by 16 and on 16-byte alignment).
    @triton.jit(do_not_specialize=["num_reqs", "stride_table"],
                do_not_specialize_on_alignment=["qsl_ptr", "seq_lens_ptr", "table_ptr", "k_scale_ptr", "v_scale_ptr",
                                                "sinks_ptr"])
    def attention(q_ptr, cache_ptr, out_ptr, partial_ptr, ml_ptr, qsl_ptr, seq_lens_ptr, table_ptr, k_scale_ptr,
                  v_scale_ptr, sinks_ptr, num_reqs, qk_scale, window, softcap, unit, stride_qt, stride_qh,
                  stride_ot, stride_oh,
                  stride_c, stride_cb, stride_ct, stride_ch, stride_table,
                  NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_P2: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr, SEGMENTS: tl.constexpr,
                  SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, SCALED: tl.constexpr, SINKS: tl.constexpr,
                  PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
        pid = tl.program_id(0)
        kv_head = tl.program_id(1)
        segment = tl.program_id(2)
        lo = tl.zeros([], tl.int32)  # binary search: the last request whose first slot is <= pid
        hi = lo + num_reqs
        while lo < hi:
            mid = (lo + hi) // 2
            before = tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= pid
            lo = tl.where(before, mid + 1, lo)
            hi = tl.where(before, hi, mid)
        req = lo - 1
        q_begin = tl.load(qsl_ptr + req)
        q_len = tl.load(qsl_ptr + req + 1) - q_begin
        num_tiles = tl.cdiv(q_len, BLOCK_Q)
        slot = pid - (q_begin // BLOCK_Q + req)
        if slot >= num_tiles:
            return
        q_first = (num_tiles - 1 - slot) * BLOCK_Q  # the longest tiles of a request start first
        context = tl.load(seq_lens_ptr + req) - q_len

        rows = tl.arange(0, BLOCK_M)
        token = q_first + rows // GROUP
        head = kv_head * GROUP + rows % GROUP
        row_ok = (rows < BLOCK_Q * GROUP) & (token < q_len)
        q_pos = context + token
        d = tl.arange(0, HEAD_P2)[None, :]
        row_dims = row_ok[:, None] & (d < HEAD_DIM)  # real rows, real head dims (a padded head has zeros past it)
        flat_token = (q_begin + token).to(tl.int64)[:, None]
        q = tl.load(q_ptr + flat_token * stride_qt + head[:, None] * stride_qh + d, mask=row_dims, other=0.0)

        # Keys [kv_begin, kv_end) matter to this tile; those in [full_begin, full_end) are visible to all its rows.
        min_pos = context + q_first
        max_pos = context + tl.minimum(q_first + BLOCK_Q, q_len) - 1
        kv_end = max_pos + 1
        full_end = (min_pos + 1) // TILE_N * TILE_N
        if SLIDING:
            kv_begin = tl.maximum(min_pos - window + 1, 0) // TILE_N * TILE_N
            full_begin = tl.minimum(tl.cdiv(tl.maximum(max_pos - window + 1, 0), TILE_N) * TILE_N, full_end)
        else:
            kv_begin = 0
            full_begin = 0
        seg_len = tl.cdiv(tl.cdiv(kv_end - kv_begin, TILE_N), SEGMENTS) * TILE_N
        seg_lo = kv_begin + segment * seg_len
        seg_hi = tl.minimum(seg_lo + seg_len, kv_end)

        if SCALED:  # a key read from an fp8 cache is stored * k_scale: the scores take the scale once
            qk_scale = qk_scale * tl.load(k_scale_ptr)
            if q_ptr.dtype.element_ty == tl.bfloat16:
                # fp8 widens to fp16 in one packed instruction, to bf16 through fp32 (sm_90 SASS: 256 scalar F2F
                # per 64-key tile, the loop 2.2x bf16's instructions): the tiles meet q in fp16, scaled by 1/16
                # (exact; through the runtime `unit`, as a constant factor would be moved after the conversion) so
                # that fp16's range holds any q below 10^6, and the scores take the 16 back.
                q = (q.to(tl.float32) * (unit * 0.0625)).to(tl.float16)
                qk_scale = qk_scale * 16.0
        unit = (tl.zeros([], dtype=tl.float32) + unit).to(q.dtype)  # a runtime 1 in the tiles' dtype
        acc = tl.zeros([BLOCK_M, HEAD_P2], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)  # finite: a fully masked tile gives p = 0, never NaN
        if SINKS:  # the head's sink logit (log2 domain, as the scores) starts segment 0's sums: weight 1, no value
            with_sink = row_ok & (rows * 0 + segment == 0)
            sink = tl.load(sinks_ptr + head, mask=with_sink, other=0.0).to(tl.float32) * 1.4426950408889634
            m_i = tl.where(with_sink, sink, m_i)
            l_i = tl.where(with_sink, 1.0, l_i)
        k_base = cache_ptr + kv_head * stride_ch
        v_base = k_base + stride_c
        table_row = table_ptr + req.to(tl.int64) * stride_table
        if SLIDING:
            acc, l_i, m_i = attend_range(acc, l_i, m_i, q, k_base, v_base, table_row, tl.maximum(kv_begin, seg_lo),
                                         tl.minimum(full_begin, seg_hi), kv_end, q_pos, qk_scale, window, softcap,
                                         unit,
                                         stride_cb, stride_ct, BLOCK_SIZE, TILE_N, HEAD_DIM, HEAD_P2, True, SLIDING,
                                         SOFTCAP, SCALED, PRECISION,
                                         INTERPRET)
        acc, l_i, m_i = attend_range(acc, l_i, m_i, q, k_base, v_base, table_row, tl.maximum(full_begin, seg_lo),
                                     tl.minimum(full_end, seg_hi), kv_end, q_pos, qk_scale, window, softcap,
                                     unit,
                                     stride_cb, stride_ct, BLOCK_SIZE, TILE_N, HEAD_DIM, HEAD_P2, False, SLIDING,
                                     SOFTCAP, SCALED, PRECISION,
                                     INTERPRET)
        acc, l_i, m_i = attend_range(acc, l_i, m_i, q, k_base, v_base, table_row, tl.maximum(full_end, seg_lo),
                                     seg_hi, kv_end, q_pos, qk_scale, window, softcap, unit,
                                     stride_cb, stride_ct, BLOCK_SIZE, TILE_N, HEAD_DIM, HEAD_P2, True, SLIDING,
                                     SOFTCAP, SCALED, PRECISION,
                                     INTERPRET)
        if SCALED:  # sum(p * stored) * v_scale = sum(p * value)
            acc = acc * tl.load(v_scale_ptr)

        if SEGMENTS == 1:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(out_ptr + flat_token * stride_ot + head[:, None] * stride_oh + d,
                     out.to(out_ptr.dtype.element_ty), mask=row_dims)
        else:
            index = (flat_token * NUM_HEADS + head[:, None]) * SEGMENTS + segment
            tl.store(partial_ptr + index * HEAD_DIM + d, acc, mask=row_dims)
            tl.store(ml_ptr + index * 2, m_i[:, None], mask=row_ok[:, None])
            tl.store(ml_ptr + index * 2 + 1, l_i[:, None], mask=row_ok[:, None])

    @triton.jit
    def reduce_segments(out_ptr, partial_ptr, ml_ptr, stride_ot, stride_oh, NUM_HEADS: tl.constexpr,
                        HEAD_DIM: tl.constexpr, HEAD_P2: tl.constexpr, SEGMENTS: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        index = (token * NUM_HEADS + head) * SEGMENTS + tl.arange(0, SEGMENTS)
        m = tl.load(ml_ptr + index * 2)
        weight = tl.exp2(m - tl.max(m, 0))
        total = tl.sum(weight * tl.load(ml_ptr + index * 2 + 1), 0)
        d = tl.arange(0, HEAD_P2)
        acc = tl.load(partial_ptr + index[:, None] * HEAD_DIM + d[None, :], mask=d[None, :] < HEAD_DIM, other=0.0)
        out = tl.sum(acc * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
        tl.store(out_ptr + token * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty),
                 mask=d < HEAD_DIM)

    return SimpleNamespace(write_kv=write_kv, attention=attention, reduce_segments=reduce_segments,
                           interpret=bool(triton.knobs.runtime.interpret))


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """k/v [T, kv_heads, head_dim] into kv_cache [2, blocks, block_size, kv_heads, head_dim] at slot_mapping [T]; with
    k_scale and v_scale ([1] fp32 on the device), an fp8 cache gets clamp(k / k_scale) and clamp(v / v_scale)."""
    tokens, kv_heads, head_dim = k.shape
    if tokens == 0:
        return
    scaled = k_scale is not None
    kernels().write_kv[(tokens,)](
        k, v, kv_cache, slot_mapping, k_scale if scaled else slot_mapping, v_scale if scaled else slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), *kv_cache.stride()[:4],
        KV_HEADS=kv_heads, HEADS_P2=next_pow2(kv_heads), HEAD_DIM=head_dim, HEAD_P2=next_pow2(head_dim),
        BLOCK_SIZE=kv_cache.shape[2], SCALED=scaled,
        FP8_MAX=torch.finfo(kv_cache.dtype).max if scaled else 0.0, INTERPRET=kernels().interpret)


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def tile_config(head_dim: int, group: int, itemsize: int, decode: bool,
                cache_itemsize: int | None = None) -> TileConfig:
    """Small row tiles for decode (memory-bound), large ones for prefill (compute-bound); tuned on an H100."""
    wide = next_pow2(head_dim) > 128
    block_m = 16 if decode else 64 if wide else 128
    tile_n = 32 if wide else 64
    stages = 3
    if itemsize == 4:  # fp32 tiles take twice the shared memory
        block_m, tile_n, stages = max(block_m // 2, 16), max(tile_n // 2, 16), 2
    warps = 8 if head_dim <= 64 and not decode else 4  # 8 warps: +7% prefill at head size 64, -50% at 256
    if decode and cache_itemsize == 1:  # an fp8 cache (H200, decode 16 x 8k: 121 us against 182 at 64 / 4 / 3)
        tile_n, warps, stages = 128, 8, 2
    return TileConfig(max(block_m, next_pow2(group)), tile_n, warps, stages)


def attention(q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, md: TritonAttnMetadata, scale: float,
              sliding_window: int | None, cfg: TileConfig | None = None, logit_softcap: float | None = None,
              k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
              sinks: torch.Tensor | None = None) -> None:
    """out [T, heads, head_dim] = paged causal attention of q [T, heads, head_dim] over kv_cache; with
    `logit_softcap`, scores become cap * tanh(scores / cap) before the softmax; with k_scale and v_scale, kv_cache is
    fp8 holding k / k_scale and v / v_scale; with `sinks` ([heads] logits), each head's sink joins the softmax's
    denominator."""
    tokens, heads, head_dim = q.shape
    kv_heads = kv_cache.shape[3]
    group = heads // kv_heads
    cfg = cfg or tile_config(head_dim, group, q.element_size(), md.max_query_len == 1, kv_cache.element_size())
    block_q = cfg.block_m // group
    num_reqs = md.seq_lens.shape[0]
    segments = md.num_segments
    split = segments > 1
    scaled = k_scale is not None
    grid = (tokens // block_q + num_reqs, kv_heads, segments)
    kernels().attention[grid](
        q, kv_cache, out, md.partial_out if split else out, md.partial_ml if split else out, md.query_start_loc,
        md.seq_lens, md.block_table, k_scale if scaled else out, v_scale if scaled else out,
        sinks if sinks is not None else out, num_reqs,
        scale / logit_softcap if logit_softcap else scale * LOG2E,
        sliding_window or 0, logit_softcap * LOG2E if logit_softcap else 0.0, 1.0, q.stride(0), q.stride(1),
        out.stride(0), out.stride(1), *kv_cache.stride()[:4], md.block_table.stride(0),
        NUM_HEADS=heads, GROUP=group, HEAD_DIM=head_dim, HEAD_P2=next_pow2(head_dim), BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_M=cfg.block_m, BLOCK_Q=block_q, TILE_N=cfg.tile_n, SEGMENTS=segments, SLIDING=bool(sliding_window),
        SOFTCAP=bool(logit_softcap), SCALED=scaled, SINKS=sinks is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else None, INTERPRET=kernels().interpret,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split:
        kernels().reduce_segments[(tokens, heads)](out, md.partial_out, md.partial_ml, out.stride(0), out.stride(1),
                                                   NUM_HEADS=heads, HEAD_DIM=head_dim,
                                                   HEAD_P2=next_pow2(head_dim), SEGMENTS=segments)


def fp8_cache_limits(platform: str) -> list[str]:
    """Why Triton cannot write and read an e4m3fn cache here (empty: it can)."""
    if platform == "rocm":  # MI300's fp8 is e4m3fnuz, and ROCM_ATTN has never run on AMD hardware
        return ["does not support kv_cache_dtype float8_e4m3fn on ROCm: untested there (MI300's own fp8 is e4m3fnuz)"]
    if platform == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        major, minor = torch.cuda.get_device_capability()
        return [f"does not support kv_cache_dtype float8_e4m3fn on sm{major}{minor}: Triton's e4m3 conversions need "
                "sm89 or later (Ada, Hopper, Blackwell)"]
    return []


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 128


class TritonAttnBackend(AttentionBackend):
    name = "TRITON_ATTN"
    platforms = ("cuda", "rocm")
    block_sizes = (16, 32, 64, 128)
    required_packages = {"triton": "triton>=3.6"}
    supports_cuda_graphs = True
    supports_logit_softcap = True
    supports_attention_sinks = True
    kv_cache_dtypes = (torch.float8_e4m3fn,)  # written scaled by the write kernel, widened to q's dtype in the tiles
    kv_segments: int | None = None  # None: chosen per batch; a power of two forces that many KV segments

    @classmethod
    def why_unsupported(cls, spec, platform: str) -> list[str]:
        reasons = super().why_unsupported(spec, platform)
        if not 16 <= spec.head_dim <= 256 or spec.head_dim % 8:
            reasons.append(f"supports head sizes from 16 to 256 in steps of 8, not {spec.head_dim}")
        if spec.kv_cache_dtype is not None:
            reasons += fp8_cache_limits(platform)
        return reasons

    def num_segments(self, num_reqs: int, max_query_len: int, max_seq_len: int) -> int:
        """Split the keys when decode programs (one per request and KV head) would leave most of the GPU idle."""
        if self.kv_segments is not None:
            return self.kv_segments
        if max_query_len != 1:
            return 1
        free = 2 * multiprocessor_count(self.device) // (num_reqs * self.spec.num_kv_heads)
        segments = min(free, max_seq_len // MIN_SEGMENT_KEYS, MAX_SEGMENTS)
        return 1 << (segments.bit_length() - 1) if segments > 1 else 1

    @staticmethod
    def host_metadata(batch: BatchLayout, width: int | None = None) -> np.ndarray:
        """One host buffer for one copy: query_start_loc [B + 1], seq_lens [B], block table [B, width]."""
        num_reqs = len(batch.query_lens)
        lengths = np.array([len(t) for t in batch.block_tables], dtype=np.int64)
        width = width or max(int(lengths.max(initial=0)), 1)
        host = np.zeros(2 * num_reqs + 1 + num_reqs * width, dtype=np.int32)
        host[:num_reqs + 1] = batch.query_start_loc
        host[num_reqs + 1:2 * num_reqs + 1] = batch.seq_lens
        table = host[2 * num_reqs + 1:].reshape(num_reqs, width)
        total = int(lengths.sum())
        if total:
            table[np.arange(width)[None, :] < lengths[:, None]] = np.fromiter(
                itertools.chain.from_iterable(batch.block_tables), dtype=np.int32, count=total)
        return host

    def build_metadata(self, batch: BatchLayout, width: int | None = None,
                       max_seq_len: int | None = None) -> TritonAttnMetadata:
        num_reqs = len(batch.query_lens)
        host = self.host_metadata(batch, width)
        width = (len(host) - 2 * num_reqs - 1) // num_reqs
        device = batch.to_device(host)
        max_query_len = int(batch.query_lens.max(initial=0))
        max_seq_len = max_seq_len or int(batch.seq_lens.max(initial=0))
        segments = self.num_segments(num_reqs, max_query_len, max_seq_len)
        md = TritonAttnMetadata(batch.slot_mapping, device[:num_reqs + 1], device[num_reqs + 1:2 * num_reqs + 1],
                                device[2 * num_reqs + 1:].view(num_reqs, width), max_query_len, max_seq_len, segments,
                                device)
        if segments > 1:
            s, tokens = self.spec, batch.slot_mapping.shape[0]
            md.partial_out = torch.empty((tokens, s.num_heads, segments, s.head_dim), dtype=torch.float32,
                                         device=batch.device)
            md.partial_ml = torch.empty((tokens, s.num_heads, segments, 2), dtype=torch.float32, device=batch.device)
        return md

    def build_graph_metadata(self, batch: BatchLayout, max_blocks: int,
                             out: TritonAttnMetadata | None = None) -> TritonAttnMetadata:
        """Block tables padded to max_blocks; the KV split chosen for the longest context, once per graph."""
        if out is None:
            return self.build_metadata(batch, max_blocks, max_blocks * batch.block_size)
        host = self.host_metadata(batch)  # the table only as wide as this batch needs: columns past a request's
        num_reqs = len(batch.query_lens)  # last block are never read, so the graph's stale ones do no harm
        width = (len(host) - 2 * num_reqs - 1) // num_reqs
        uploaded = batch.to_device(host)
        out.buffer[:2 * num_reqs + 1].copy_(uploaded[:2 * num_reqs + 1])
        out.block_table[:, :width].copy_(uploaded[2 * num_reqs + 1:].view(num_reqs, width))
        out.slot_mapping.copy_(batch.slot_mapping, non_blocking=True)
        return out

    def tile_config(self, head_dim: int, group: int, itemsize: int, decode: bool) -> TileConfig:
        """The launch settings of the attention kernel (a platform's backend may tune its own)."""
        return tile_config(head_dim, group, itemsize, decode, self.spec.cache_dtype.itemsize)

    def forward(self, layer, q, k, v, kv_cache, metadata: TritonAttnMetadata) -> torch.Tensor:
        scales = (layer.k_scale, layer.v_scale) if self.spec.kv_cache_dtype is not None else (None, None)
        write_kv(k, v, kv_cache, metadata.slot_mapping, *scales)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        cfg = self.tile_config(q.shape[2], q.shape[1] // kv_cache.shape[3], q.element_size(),
                               metadata.max_query_len == 1)
        attention(q, kv_cache, out, metadata, layer.scale, layer.sliding_window, cfg, layer.logit_softcap, *scales,
                  layer.sinks)
        return out


@hookimpl
def llmserve_attention_backends():
    return {TritonAttnBackend.name: f"{__name__}:{TritonAttnBackend.__name__}"}
