"""FLASHINFER: flashinfer-python's paged attention kernels, planned once per step for all layers.

Decode-only steps use its decode wrapper (on tensor cores), steps with prefill chunks its prefill wrapper (causal,
over the cached prefix). The KV cache has TRITON_ATTN's layout, [2, blocks, block_size, kv_heads, head_dim]: K and
V are each FlashInfer's NHD page layout, and the same Triton kernel writes them. A wrapper is planned for one
window, so a model with sliding-window layers plans one wrapper per window. CUDA graphs: one decode wrapper per
captured batch size, with fixed index buffers, planned again before each replay.

An fp8 KV cache (kv_cache_dtype): the wrappers are planned with an fp8 kv_data_type, and FlashInfer's FA2 kernels widen
the keys and values to the query's dtype. Its run() takes k_scale and v_scale only as host numbers (folded into the
softmax scale, baked into a captured graph), so the layer's device scales are applied around it instead: the query
times k_scale (scores = q . k_stored * k_scale), the output times v_scale.

flashinfer is imported when the backend is built, never on import: listing the backends must not import it.
"""
import itertools
import math
import os
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmserve.backends.triton_attn import fp8_cache_limits, write_kv
from llmserve.interfaces import AttentionBackend, BatchLayout
from llmserve.plugins import hookimpl

# FlashInfer's float workspace holds split-KV partial results; 128 MiB (its suggestion) is too little for MQA.
WORKSPACE_ENV = "LLMSERVE_FLASHINFER_WORKSPACE_BYTES"


@dataclass
class FlashInferMetadata:
    slot_mapping: torch.Tensor
    wrappers: dict[int, Any]  # window_left (-1: none) -> the wrapper planned for this step


@dataclass
class PageIndex:
    """A batch's pages in FlashInfer's CSR form, int32: host tensors (plan() schedules from them) but the indices,
    already on the device (plan() would copy them from the host with a sync in CUDA-graph mode)."""

    indptr: torch.Tensor  # [B + 1]
    indices: torch.Tensor  # [indptr[-1]] block ids, on the device
    last_page_len: torch.Tensor  # [B] tokens in each request's last page
    qo_indptr: torch.Tensor | None  # [B + 1] query_start_loc, for the prefill wrapper only


class FlashInferBackend(AttentionBackend):
    name = "FLASHINFER"
    platforms = ("cuda",)
    dtypes = (torch.bfloat16, torch.float16)
    head_sizes = (64, 128, 256)
    block_sizes = (16, 32, 64, 128)
    required_packages = {"flashinfer": "flashinfer-python", "triton": "triton>=3.6"}  # triton: the KV write
    supports_cuda_graphs = True
    supports_logit_softcap = True  # one cap for all layers, planned with the step (AttentionSpec.logit_softcap)
    kv_cache_dtypes = (torch.float8_e4m3fn,)

    @classmethod
    def why_unsupported(cls, spec, platform: str) -> list[str]:
        reasons = super().why_unsupported(spec, platform)
        if spec.kv_cache_dtype is not None:
            reasons += fp8_cache_limits(platform)  # the KV write is TRITON_ATTN's kernel
        return reasons

    def __init__(self, spec, device: torch.device) -> None:
        super().__init__(spec, device)
        import flashinfer

        self.flashinfer = flashinfer
        self.workspace = torch.empty(int(os.environ.get(WORKSPACE_ENV, 512 << 20)), dtype=torch.uint8, device=device)
        self.windows = [-1] + ([spec.sliding_window - 1] if spec.sliding_window else [])
        self.prefill = {w: flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2")
                        for w in self.windows}
        self.decode = {w: self.decode_wrapper() for w in self.windows}
        self.planned = weakref.WeakKeyDictionary()  # wrapper -> a CUDA event after its last plan's copies

    def decode_wrapper(self, graph_size: int | None = None, max_blocks: int = 0):
        buffers = {}
        if graph_size is not None:
            int32 = dict(dtype=torch.int32, device=self.device)
            buffers = dict(use_cuda_graph=True, paged_kv_indptr_buffer=torch.zeros(graph_size + 1, **int32),
                           paged_kv_indices_buffer=torch.zeros(graph_size * max_blocks, **int32),
                           paged_kv_last_page_len_buffer=torch.zeros(graph_size, **int32))
        return self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD", use_tensor_cores=True,
                                                                  **buffers)

    def page_index(self, batch: BatchLayout, decode: bool) -> PageIndex:
        bs = batch.block_size
        seq_lens = batch.seq_lens
        pages = -(-seq_lens // bs)
        # A CUDA graph's padding rows have one token and no block: they read block 0, as in TRITON_ATTN.
        tables = [t[:p] if len(t) >= p else [0] * p for t, p in zip(batch.block_tables, pages.tolist())]
        indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
        indices = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32, count=int(indptr[-1]))
        last = np.where(pages > 0, seq_lens - (pages - 1) * bs, 0).astype(np.int32)
        return PageIndex(batch.pinned(indptr), batch.to_device(indices), batch.pinned(last),
                         None if decode else batch.pinned(batch.query_start_loc.astype(np.int32)))

    def plan_all(self, wrappers: dict, batch: BatchLayout, decode: bool) -> None:
        pages = self.page_index(batch, decode)
        for window, wrapper in wrappers.items():
            self.plan(wrapper, pages, window, decode)

    def plan(self, wrapper, pages: PageIndex, window: int, decode: bool) -> None:
        # plan() stages its schedule in one pinned buffer per wrapper and copies it without waiting: before
        # overwriting it, wait until the previous step's copy has run (the start of that step on the GPU).
        if wrapper in self.planned:
            self.planned[wrapper].synchronize()
        s = self.spec
        common = dict(window_left=window, q_data_type=s.dtype, kv_data_type=s.cache_dtype,
                      logits_soft_cap=s.logit_softcap or 0.0)
        try:
            if decode:
                wrapper.plan(pages.indptr, pages.indices, pages.last_page_len, s.num_heads, s.num_kv_heads,
                             s.head_dim, s.block_size, **common)
            else:
                wrapper.plan(pages.qo_indptr, pages.indptr, pages.indices, pages.last_page_len, s.num_heads,
                             s.num_kv_heads, s.head_dim, s.block_size, causal=True, **common)
        except RuntimeError as e:
            if "workspace" not in str(e).lower():
                raise
            raise ValueError(f"FLASHINFER's workspace of {self.workspace.numel()} bytes is too small for this model "
                             f"and batch; set {WORKSPACE_ENV} to more, or use TRITON_ATTN ({e})") from None
        if wrapper not in self.planned:
            self.planned[wrapper] = torch.cuda.Event()
        self.planned[wrapper].record()

    def build_metadata(self, batch: BatchLayout) -> FlashInferMetadata:
        decode = int(batch.query_lens.max(initial=0)) == 1
        wrappers = self.decode if decode else self.prefill
        self.plan_all(wrappers, batch, decode)
        return FlashInferMetadata(batch.slot_mapping, dict(wrappers))

    def build_graph_metadata(self, batch: BatchLayout, max_blocks: int,
                             out: FlashInferMetadata | None = None) -> FlashInferMetadata:
        if out is None:
            wrappers = {w: self.decode_wrapper(len(batch.query_lens), max_blocks) for w in self.windows}
            out = FlashInferMetadata(batch.slot_mapping, wrappers)
        else:
            out.slot_mapping.copy_(batch.slot_mapping, non_blocking=True)
        self.plan_all(out.wrappers, batch, decode=True)
        return out

    def forward(self, layer, q, k, v, kv_cache, metadata: FlashInferMetadata) -> torch.Tensor:
        scaled = self.spec.kv_cache_dtype is not None
        write_kv(k, v, kv_cache, metadata.slot_mapping, *((layer.k_scale, layer.v_scale) if scaled else ()))
        wrapper = metadata.wrappers[layer.sliding_window - 1 if layer.sliding_window else -1]
        q_scale = layer.scale * math.sqrt(self.spec.head_dim)  # plans use 1/sqrt(head_dim)
        if scaled:  # the device scales around the kernel (the module docstring says why)
            q = (q.float() * layer.k_scale).to(q.dtype)
        out = wrapper.run(q, (kv_cache[0], kv_cache[1]), q_scale=None if math.isclose(q_scale, 1.0) else q_scale)
        return (out.float() * layer.v_scale).to(out.dtype) if scaled else out


@hookimpl
def llmserve_attention_backends():
    return {FlashInferBackend.name: f"{__name__}:{FlashInferBackend.__name__}"}
