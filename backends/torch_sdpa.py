"""TORCH_SDPA: torch's scaled_dot_product_attention over the paged cache (the CPU backend and the reference).

Requests are packed into a few padded groups of similar length (decode rows apart from prefill
chunks), so each layer makes one SDPA call per group, never one per request.
"""
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from llmserve.interfaces import AttentionBackend, BatchLayout
from llmserve.plugins import hookimpl

MAX_PADDING = 1.3  # a group's padded size may exceed its real size by this factor
GROUP_KV_BYTES = 8 << 20  # K and V gathered for one group stay in the CPU cache for SDPA: 2x faster decode


@dataclass
class SdpaGroup:
    query_index: torch.Tensor  # [G * max_q] flat token of each padded query (0 for padding)
    valid_index: torch.Tensor  # positions in [G * max_q] that hold real queries
    block_table: torch.Tensor  # [G, max_blocks]
    flat_table: torch.Tensor  # block_table flattened
    positions: torch.Tensor  # [G, max_q] position of each query (-1 for padding)
    out_index: torch.Tensor  # flat tokens of the valid queries, in query_valid order
    fresh: bool  # every row is a whole prompt from position 0: causal without a mask, skipping the masked half
    masks: dict = field(default_factory=dict)  # sliding window -> [G, 1, max_q, keys], built once per step

    def mask(self, num_keys: int, sliding_window: int | None) -> torch.Tensor:
        if sliding_window not in self.masks:
            key_pos = torch.arange(num_keys, device=self.positions.device)
            query_pos = self.positions.unsqueeze(-1)
            allowed = key_pos <= query_pos
            if sliding_window:
                allowed &= key_pos > query_pos - sliding_window
            allowed[:, :, 0] |= query_pos.squeeze(-1) < 0  # padded queries attend to one key, never to none
            self.masks[sliding_window] = allowed.unsqueeze(1)
        return self.masks[sliding_window]


@dataclass
class SdpaMetadata:
    slot_mapping: torch.Tensor
    groups: list[SdpaGroup]


def pack_groups(query_lens: np.ndarray, seq_lens: np.ndarray, max_keys: int) -> list[np.ndarray]:
    """Rows split into decode and prefill, each sorted by length and cut where padding would grow too much
    or the group would gather more than `max_keys` key slots."""
    groups = []
    for rows in (np.flatnonzero(query_lens == 1), np.flatnonzero(query_lens > 1)):
        rows = rows[np.argsort(seq_lens[rows], kind="stable")]
        start, real = 0, 0
        for i, row in enumerate(rows):
            real += int(query_lens[row]) * int(seq_lens[row])
            padded = (i - start + 1) * int(query_lens[rows[start:i + 1]].max()) * int(seq_lens[row])
            if i > start and (padded > MAX_PADDING * real or (i - start + 1) * int(seq_lens[row]) > max_keys):
                groups.append(rows[start:i])
                start, real = i, int(query_lens[row]) * int(seq_lens[row])
        if len(rows) > start:
            groups.append(rows[start:])
    return groups


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x / scale in a scaled cache's dtype (fp8), clamped to its range, as raw bytes (CPU index_copy_ has no fp8)."""
    limit = torch.finfo(dtype).max
    return (x.float() / scale).clamp(-limit, limit).to(dtype).view(torch.uint8)


def dequantize(stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return stored.float() * scale


def attend(query, keys, values, mask, scale: float, logit_softcap: float | None,
           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """[G, heads, Q, d] queries over [G, kv_heads, K, d] keys and values (the query's dtype, or fp32 from a scaled
    cache); SDPA unless scores are soft-capped or the softmax has sinks ([heads] logits in its denominator), which
    SDPA cannot do (then the same math in plain torch, in fp32). mask None (SDPA only): causal from key 0 (query i
    sees keys 0..i), which SDPA computes without the masked half."""
    if not logit_softcap and sinks is None:
        if query.device.type == "cpu" and query.dtype != torch.float32 and query.shape[2] == 1:
            # torch's CPU kernel decodes half precision 3 to 5x slower than fp32, conversion included (issue 15)
            return F.scaled_dot_product_attention(query.float(), keys.float(), values.float(), attn_mask=mask,
                                                  scale=scale, enable_gqa=True).to(query.dtype)
        return F.scaled_dot_product_attention(query, keys.to(query.dtype), values.to(query.dtype), attn_mask=mask,
                                              is_causal=mask is None, scale=scale, enable_gqa=True)
    group = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1).float(), values.repeat_interleave(group, 1).float()
    scores = query.float() @ keys.transpose(-1, -2)
    scores = torch.tanh(scores * (scale / logit_softcap)) * logit_softcap if logit_softcap else scores * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        return (scores.softmax(-1) @ values).to(query.dtype)
    sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    return (torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1] @ values).to(query.dtype)


class TorchSdpaBackend(AttentionBackend):
    name = "TORCH_SDPA"
    platforms = ("cpu", "cuda", "rocm")
    supports_logit_softcap = True
    supports_attention_sinks = True
    kv_cache_dtypes = (torch.float8_e4m3fn,)  # written scaled, gathered blocks widened to fp32 with the scale

    def packed_rows(self, query_lens: np.ndarray, seq_lens: np.ndarray, max_keys: int) -> list[np.ndarray]:
        """The rows this backend attends to with SDPA, in groups (all of them; CPU_ATTN keeps those of at most 16 new tokens)."""
        return pack_groups(query_lens, seq_lens, max_keys)

    def build_metadata(self, batch: BatchLayout) -> SdpaMetadata:
        starts, seq_lens, query_lens = batch.query_start_loc, batch.seq_lens, batch.query_lens
        groups = []
        s = self.spec
        itemsize = 4 if s.kv_cache_dtype is not None else s.dtype.itemsize  # a scaled cache is gathered as fp32
        max_keys = GROUP_KV_BYTES // (2 * s.num_kv_heads * s.head_dim * itemsize)
        for rows in self.packed_rows(query_lens, seq_lens, max_keys):
            max_q = int(query_lens[rows].max())
            max_blocks = -(-int(seq_lens[rows].max()) // batch.block_size)
            offsets = np.arange(max_q)
            valid = offsets[None, :] < query_lens[rows, None]
            query_index = np.where(valid, starts[rows, None] + offsets[None, :], 0)
            positions = np.where(valid, batch.num_computed[rows, None] + offsets[None, :], -1)
            table = np.zeros((len(rows), max_blocks), dtype=np.int64)
            for i, row in enumerate(rows):
                blocks = batch.block_tables[row][:max_blocks]
                table[i, :len(blocks)] = blocks
            to = lambda a: batch.to_device(np.ascontiguousarray(a))
            fresh = max_q > 1 and not batch.num_computed[rows].any()
            groups.append(SdpaGroup(to(query_index.ravel()), to(np.flatnonzero(valid)), to(table), to(table.ravel()),
                                    to(positions), to(query_index[valid]), fresh))
        return SdpaMetadata(batch.slot_mapping, groups)

    def forward(self, layer, q, k, v, kv_cache, metadata: SdpaMetadata) -> torch.Tensor:
        stored = kv_cache.dtype
        scaled = self.spec.kv_cache_dtype is not None
        if scaled:  # fp8 as raw bytes: index_copy_ and index_select have no fp8 on every device
            k, v = quantize(k, layer.k_scale, stored), quantize(v, layer.v_scale, stored)
            kv_cache = kv_cache.view(torch.uint8)
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        _, block_size, kv_heads, head_dim = key_cache.shape
        key_cache.view(-1, kv_heads, head_dim).index_copy_(0, metadata.slot_mapping, k)
        value_cache.view(-1, kv_heads, head_dim).index_copy_(0, metadata.slot_mapping, v)
        out = torch.empty_like(q)
        for g in metadata.groups:
            rows, max_blocks = g.block_table.shape
            shape = (rows, max_blocks * block_size, kv_heads, head_dim)
            # index_select on a 2-D view copies whole blocks; advanced indexing on the 5-D cache is ~8x slower
            keys = key_cache.view(key_cache.shape[0], -1).index_select(0, g.flat_table).view(shape).transpose(1, 2)
            values = value_cache.view(value_cache.shape[0], -1).index_select(0, g.flat_table).view(shape).transpose(1, 2)
            if scaled:
                keys = dequantize(keys.view(stored), layer.k_scale)
                values = dequantize(values.view(stored), layer.v_scale)
            causal = g.fresh and not layer.sliding_window and not layer.logit_softcap and layer.sinks is None
            mask = None if causal else g.mask(max_blocks * block_size, layer.sliding_window)
            query = q.index_select(0, g.query_index).view(rows, -1, *q.shape[1:]).transpose(1, 2)
            attn = attend(query, keys, values, mask, layer.scale, layer.logit_softcap, layer.sinks)
            attn = attn.transpose(1, 2).reshape(-1, *q.shape[1:])
            out.index_copy_(0, g.out_index, attn if len(g.valid_index) == len(attn) else attn.index_select(0, g.valid_index))
        return out


@hookimpl
def llmserve_attention_backends():
    return {TorchSdpaBackend.name: f"{__name__}:{TorchSdpaBackend.__name__}"}
