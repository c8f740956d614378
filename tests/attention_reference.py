"""A plain fp32 reference for paged attention backends, and random paged batches to test them on."""
import math
import zlib
from types import SimpleNamespace

import numpy as np
import torch

from llmserve.interfaces import AttentionSpec, BatchLayout

TOLERANCE = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def reference(q, k, v, cache, tables, requests, scale, window, softcap=None) -> torch.Tensor:
    """Each request's queries over its cached tokens (read through its block table) and its new ones, in fp32."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    block_size, group, start = cache.shape[2], q.shape[1] // k.shape[1], 0
    for (context, n), table in zip(requests, tables):
        pos = torch.arange(context, device=q.device)
        blocks = torch.tensor(table, device=q.device, dtype=torch.long)[pos // block_size]
        keys = torch.cat([cache[0, blocks, pos % block_size], k[start:start + n]]).float().repeat_interleave(group, 1)
        values = torch.cat([cache[1, blocks, pos % block_size], v[start:start + n]]).float().repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[start:start + n].float(), keys) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        query_pos = torch.arange(context, context + n, device=q.device)[:, None]
        key_pos = torch.arange(context + n, device=q.device)[None, :]
        visible = key_pos <= query_pos
        if window:
            visible &= key_pos > query_pos - window
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[start:start + n] = torch.einsum("hqk,khd->qhd", probs, values)
        start += n
    return out


def make_batch(requests, block_size: int):
    """Block tables drawn from a shuffled pool, with a spare block each (the allocator may have one ready)."""
    needed = [math.ceil((c + n) / block_size) + (1 if c + n else 0) for c, n in requests]
    pool = torch.randperm(sum(needed) + 3).tolist()
    tables, used = [], 0
    for count in needed:
        tables.append(pool[used:used + count])
        used += count
    slots = [table[p // block_size] * block_size + p % block_size
             for (c, n), table in zip(requests, tables) for p in range(c, c + n)]
    return tables, slots, len(pool)


def check_backend(backend_cls, dtype, heads, kv_heads, head_dim, block_size, requests, window=None, device="cuda",
                  configure=lambda backend: None, softcap=None, scale=None) -> None:
    """One step of `requests` ((cached tokens, new tokens) each) through a backend against the reference; q, k and v
    are views into one projection output, as the models pass them. `softcap`: attention logit soft-capping; `scale`:
    the softmax scale (default 1/sqrt(head_dim))."""
    torch.manual_seed(zlib.crc32(repr((dtype, heads, kv_heads, head_dim, block_size, requests, window, softcap,
                                       scale)).encode()))
    tables, slots, num_blocks = make_batch(requests, block_size)
    tokens = sum(n for _, n in requests)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, device=device).to(dtype)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, device=device).to(dtype)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    backend = backend_cls(AttentionSpec(heads, kv_heads, head_dim, dtype, block_size, window, softcap),
                          torch.device(device))
    configure(backend)
    layout = BatchLayout(np.array([n for _, n in requests]), np.array([c for c, _ in requests]), tables,
                         torch.tensor(slots, dtype=torch.int64, device=device), block_size, torch.device(device))
    layer = SimpleNamespace(scale=scale or head_dim**-0.5, sliding_window=window, logit_softcap=softcap)
    expected = reference(q, k, v, cache, tables, requests, layer.scale, window, softcap)
    out = backend.forward(layer, q, k, v, cache, backend.build_metadata(layout))
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
