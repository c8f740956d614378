"""FLASH_ATTN: FlashAttention's paged kernels, reading the cache in place through each request's block table.

One call per layer covers the whole step, prefill chunks and decodes alike: queries packed by cu_seqlens_q, each
request's keys read through its row of the page table up to its length (seqused_k), the causal mask aligned to the
end of each request's keys (so a chunk after a cached prefix sees the prefix), a sliding window as
window_size=(window - 1, 0), the soft-cap in the kernel where it has one. The cache has TRITON_ATTN's layout,
[2, blocks, block_size, kv_heads, head_dim]: K and V are each FlashAttention's paged layout
[pages, page_size, kv_heads, head_dim], and TRITON_ATTN's write kernel stores the step's new keys and values.

FlashAttention comes in three packagings, and the first that is importable and can run the model is used:
  flash_attn      FlashAttention-2, `flash_attn_varlen_func(..., block_table=)`; its paged kernels take pages of a
                  multiple of 256 tokens (`--block-size 256`).
  flash-attn-4    FlashAttention-4, the CuTe DSL kernels for Hopper and Blackwell (`flash_attn.cute`), with a page
                  table; compiled on first use for each shape family.
  torch >= 2.13   PyTorch's bundled FlashAttention-2, `torch.nn.attention.varlen.varlen_attn(..., block_table=)`;
                  the same page-size rule as flash_attn, and no soft-cap.
Only flash-attn-4 has run here (an H200); the other two follow their documented signatures (docs/plugins.md).
The packages are imported when the backend is built or asked, never when the backends are listed.
"""
import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch

from llmserve.backends.triton_attn import TritonAttnBackend, write_kv
from llmserve.interfaces import AttentionBackend, AttentionSpec, BatchLayout
from llmserve.plugins import hookimpl


@dataclass
class FlashAttnMetadata:
    slot_mapping: torch.Tensor  # [T] int64, negative: skip
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    seqused_k: torch.Tensor  # [B] int32: each request's keys after this step
    page_table: torch.Tensor  # [B, max_blocks] int32, padded with block 0
    cu_seqlens_k: torch.Tensor  # [B + 1] int32, for the FlashAttention-2 entry points
    max_query_len: int
    max_seq_len: int  # an upper bound of seqused_k (a CUDA graph's covers every replay)
    buffer: torch.Tensor  # the device buffer the four tensors above are views of


@dataclass
class Implementation:
    """One packaging of FlashAttention: how to find it, what it cannot do, and one attention call."""

    name: str
    requirement: str  # what pip installs
    attend: Callable  # (q, k_pages, v_pages, metadata, scale, window, softcap) -> [T, heads, head_dim]
    limits: Callable[[AttentionSpec], list[str]]  # reasons it cannot run this spec, once importable
    why_missing: Callable[[], str | None]  # None: importable

    def reasons(self, spec: AttentionSpec) -> list[str]:
        missing = self.why_missing()
        return [missing] if missing else self.limits(spec)


def window_size(window: int | None) -> tuple[int, int]:
    return (window - 1, 0) if window else (-1, 0)


# flash_attn (FlashAttention-2) -------------------------------------------------------------------------------------

def fa2_missing() -> str | None:
    # flash-attn-4 installs the namespace package flash_attn (holding only flash_attn.cute): look for FA2's module.
    if (importlib.util.find_spec("flash_attn") is None
            or importlib.util.find_spec("flash_attn.flash_attn_interface") is None):
        return "not installed: pip install flash-attn --no-build-isolation"
    return None


def fa2_limits(spec: AttentionSpec) -> list[str]:
    reasons = [] if spec.block_size % 256 == 0 else [
        f"its paged kernels need a block size that is a multiple of 256, not {spec.block_size} "
        "(--block-size 256)"]
    if spec.head_dim > 256 or spec.head_dim % 8:
        reasons.append(f"supports head sizes up to 256 in steps of 8, not {spec.head_dim}")
    return reasons


def fa2_attend(q, k_pages, v_pages, md: FlashAttnMetadata, scale, window, softcap):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k_pages, v_pages, md.cu_seqlens_q, md.cu_seqlens_k, md.max_query_len,
                                  md.max_seq_len, softmax_scale=scale, causal=True, window_size=window_size(window),
                                  softcap=softcap or 0.0, block_table=md.page_table)


# flash-attn-4 (the CuTe DSL kernels) -------------------------------------------------------------------------------

def fa4_missing() -> str | None:
    if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("flash_attn.cute") is None:
        return "not installed: pip install --pre flash-attn-4"
    return None


@functools.cache
def compute_capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def fa4_limits(spec: AttentionSpec) -> list[str]:
    capability = compute_capability()
    if capability is None:
        return ["needs a CUDA GPU"]
    major = capability[0]
    if major not in (9, 10, 11):
        return [f"its paged kernels run on Hopper and Blackwell (sm90/sm100), not sm{major}{capability[1]}"]
    if spec.head_dim % 8:
        return [f"needs a head size divisible by 8, not {spec.head_dim}"]
    if major == 9 and not 8 <= spec.head_dim <= 256:
        return [f"on Hopper supports head sizes 8 to 256, not {spec.head_dim}"]
    if major in (10, 11) and not (spec.head_dim <= 128 or spec.head_dim == 256):
        return [f"on Blackwell supports head sizes up to 128 and 256, not {spec.head_dim}"]
    return []


def fa4_attend(q, k_pages, v_pages, md: FlashAttnMetadata, scale, window, softcap):
    from flash_attn.cute import flash_attn_varlen_func

    out = flash_attn_varlen_func(q, k_pages, v_pages, cu_seqlens_q=md.cu_seqlens_q, seqused_k=md.seqused_k,
                                 max_seqlen_q=md.max_query_len, max_seqlen_k=md.max_seq_len, page_table=md.page_table,
                                 softmax_scale=scale, causal=True,
                                 window_size=(window - 1, 0) if window else (None, None), softcap=softcap or 0.0)
    return out[0] if isinstance(out, tuple) else out


# torch >= 2.13 ---------------------------------------------------------------------------------------------------

def torch_missing() -> str | None:
    # By version, not by importing torch.nn.attention.varlen: that pulls in two thousand modules, triton's among them.
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 13):
        return f"torch {torch.__version__}'s varlen_attn takes no block_table: pip install 'torch>=2.13'"
    return None


def torch_limits(spec: AttentionSpec) -> list[str]:
    reasons = fa2_limits(spec)  # the same FlashAttention-2 kernels, without the soft-cap
    if spec.logit_softcap:
        reasons.append("has no soft-cap")
    return reasons


def torch_attend(q, k_pages, v_pages, md: FlashAttnMetadata, scale, window, softcap):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k_pages, v_pages, md.cu_seqlens_q, md.cu_seqlens_k, md.max_query_len, md.max_seq_len,
                       scale=scale, window_size=window_size(window), enable_gqa=True, seqused_k=md.seqused_k,
                       block_table=md.page_table)


IMPLEMENTATIONS = (
    Implementation("flash_attn (FlashAttention-2)", "flash-attn", fa2_attend, fa2_limits, fa2_missing),
    Implementation("flash-attn-4 (CuTe DSL)", "flash-attn-4", fa4_attend, fa4_limits, fa4_missing),
    Implementation("torch varlen_attn (FlashAttention-2)", "torch>=2.13", torch_attend, torch_limits, torch_missing),
)


def pick(spec: AttentionSpec) -> tuple[Implementation | None, list[str]]:
    """The first implementation that can run `spec`, and why each one before it (or every one) cannot."""
    skipped = []
    for implementation in IMPLEMENTATIONS:
        reasons = implementation.reasons(spec)
        if not reasons:
            return implementation, skipped
        skipped.append(f"{implementation.name}: {'; '.join(reasons)}")
    return None, skipped


class FlashAttnBackend(AttentionBackend):
    name = "FLASH_ATTN"
    platforms = ("cuda",)
    dtypes = (torch.bfloat16, torch.float16)
    block_sizes = (16, 32, 64, 128, 256)
    required_packages: ClassVar[dict[str, str]] = {"triton": "triton>=3.6"}  # the KV write
    supports_cuda_graphs = True
    supports_logit_softcap = True  # flash_attn and flash-attn-4; torch's refuses a capped model
    kv_cache_dtypes_why = ("FlashAttention's paged kernels (flash_attn, flash-attn-4, torch's varlen_attn) take keys "
                           "and values in the query's dtype")

    @classmethod
    def why_unsupported(cls, spec, platform: str) -> list[str]:
        reasons = super().why_unsupported(spec, platform)
        implementation, skipped = pick(spec)
        if implementation is None:
            reasons.append("no FlashAttention implementation can run it: " + " | ".join(skipped))
        return reasons

    @classmethod
    def details(cls, spec: AttentionSpec, platform: str) -> list[str]:
        if platform not in cls.platforms:
            return []
        implementation, skipped = pick(spec)
        if implementation is None:
            return []
        return [f"uses {implementation.name}" + (f" (not {' | '.join(skipped)})" if skipped else "")]

    def __init__(self, spec, device: torch.device) -> None:
        super().__init__(spec, device)
        self.implementation, _ = pick(spec)
        if self.implementation is None:
            raise ValueError("FLASH_ATTN: " + "; ".join(self.why_unsupported(spec, "cuda")))

    @staticmethod
    def host_metadata(batch: BatchLayout, width: int | None = None) -> np.ndarray:
        """One host buffer for one copy: TRITON_ATTN's (cu_seqlens_q [B + 1], seqused_k [B], page table [B, width])
        with cu_seqlens_k [B + 1] after seqused_k."""
        num_reqs = len(batch.query_lens)
        host = TritonAttnBackend.host_metadata(batch, width)
        cu_seqlens_k = np.concatenate([[0], np.cumsum(host[num_reqs + 1:2 * num_reqs + 1])]).astype(np.int32)
        return np.concatenate([host[:2 * num_reqs + 1], cu_seqlens_k, host[2 * num_reqs + 1:]])

    def build_metadata(self, batch: BatchLayout, width: int | None = None,
                       max_seq_len: int | None = None) -> FlashAttnMetadata:
        num_reqs = len(batch.query_lens)
        host = self.host_metadata(batch, width)
        width = (len(host) - 3 * num_reqs - 2) // num_reqs
        device = batch.to_device(host)
        return FlashAttnMetadata(batch.slot_mapping, device[:num_reqs + 1], device[num_reqs + 1:2 * num_reqs + 1],
                                 device[3 * num_reqs + 2:].view(num_reqs, width),
                                 device[2 * num_reqs + 1:3 * num_reqs + 2], int(batch.query_lens.max(initial=0)),
                                 max_seq_len or int(batch.seq_lens.max(initial=0)), device)

    def build_graph_metadata(self, batch: BatchLayout, max_blocks: int,
                             out: FlashAttnMetadata | None = None) -> FlashAttnMetadata:
        """The page table padded to max_blocks and max_seq_len its bound, so that one graph serves every replay."""
        if out is None:
            return self.build_metadata(batch, max_blocks, max_blocks * batch.block_size)
        num_reqs = len(batch.query_lens)
        host = self.host_metadata(batch)  # the table only as wide as this batch needs: columns past a request's
        width = (len(host) - 3 * num_reqs - 2) // num_reqs  # last page are never read
        uploaded = batch.to_device(host)
        out.buffer[:3 * num_reqs + 2].copy_(uploaded[:3 * num_reqs + 2])
        out.page_table[:, :width].copy_(uploaded[3 * num_reqs + 2:].view(num_reqs, width))
        out.slot_mapping.copy_(batch.slot_mapping, non_blocking=True)
        return out

    def forward(self, layer, q, k, v, kv_cache, metadata: FlashAttnMetadata) -> torch.Tensor:
        write_kv(k, v, kv_cache, metadata.slot_mapping)
        return self.implementation.attend(q, kv_cache[0], kv_cache[1], metadata, layer.scale, layer.sliding_window,
                                          layer.logit_softcap)


@hookimpl
def llmserve_attention_backends():
    return {FlashAttnBackend.name: f"{__name__}:{FlashAttnBackend.__name__}"}
