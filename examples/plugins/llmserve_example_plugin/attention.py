"""EXAMPLE_ATTN: attention over the paged KV cache in plain PyTorch, one request at a time.

A reference, not a fast kernel: each request gathers its keys and values from the cache by slot and computes
softmax(q k^T * scale, causal) v. EXAMPLE_COMPILED_ATTN is the same math compiled by torch.compile, which on a GPU
generates Triton kernels; so it declares what it needs (CUDA and the triton package) and llmserve refuses it, with
those reasons, anywhere else.
"""
from dataclasses import dataclass

import numpy as np
import torch

from llmserve.interfaces import AttentionBackend, AttentionSpec, BatchLayout


@dataclass
class RequestSlice:
    start: int  # the request's queries are the flat tokens start:end
    end: int
    key_slots: torch.Tensor  # [seq_len] cache slot of each of its tokens, oldest first


@dataclass
class ExampleMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    requests: list[RequestSlice]


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
           sliding_window: int | None) -> torch.Tensor:
    """q [Q, heads, d]: the last Q of the S tokens whose keys and values [S, kv_heads, d] are given."""
    group = q.shape[1] // keys.shape[1]  # query heads per KV head (grouped-query attention)
    keys, values = keys.repeat_interleave(group, dim=1).float(), values.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys) * scale
    seq_len = keys.shape[0]
    query_pos = torch.arange(seq_len - q.shape[0], seq_len, device=q.device)[:, None]
    key_pos = torch.arange(seq_len, device=q.device)
    allowed = key_pos <= query_pos
    if sliding_window:
        allowed &= key_pos > query_pos - sliding_window
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)


class ExampleAttentionBackend(AttentionBackend):
    name = "EXAMPLE_ATTN"
    platforms = ("cpu", "cuda", "rocm")  # what it declares here is what why_unsupported() checks
    attend = staticmethod(attend)

    def build_metadata(self, batch: BatchLayout) -> ExampleMetadata:
        starts, block_size = batch.query_start_loc, batch.block_size
        requests = []
        for i, table in enumerate(batch.block_tables):
            positions = np.arange(batch.seq_lens[i])
            slots = np.asarray(table)[positions // block_size] * block_size + positions % block_size
            requests.append(RequestSlice(int(starts[i]), int(starts[i + 1]), torch.from_numpy(slots).to(batch.device)))
        return ExampleMetadata(batch.slot_mapping, requests)

    def forward(self, layer, q, k, v, kv_cache, metadata: ExampleMetadata) -> torch.Tensor:
        # the default cache layout (kv_cache_shape): [2 (K, V), blocks, block_size, kv_heads, head_dim]
        key_cache, value_cache = (c.view(-1, *c.shape[-2:]) for c in kv_cache)  # [slots, kv_heads, head_dim]
        key_cache.index_copy_(0, metadata.slot_mapping, k)
        value_cache.index_copy_(0, metadata.slot_mapping, v)
        out = torch.empty_like(q)
        for r in metadata.requests:
            keys, values = key_cache.index_select(0, r.key_slots), value_cache.index_select(0, r.key_slots)
            out[r.start:r.end] = self.attend(q[r.start:r.end], keys, values, layer.scale, layer.sliding_window)
        return out


class ExampleCompiledAttentionBackend(ExampleAttentionBackend):
    name = "EXAMPLE_COMPILED_ATTN"
    platforms = ("cuda",)
    required_packages = {"triton": "triton"}  # import name -> pip requirement

    def __init__(self, spec: AttentionSpec, device: torch.device) -> None:
        super().__init__(spec, device)
        self.attend = torch.compile(attend, dynamic=True)  # compiled only once this backend is chosen
