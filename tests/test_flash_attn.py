"""FLASH_ATTN: which FlashAttention packaging it uses and why (here, on the CPU), its packed metadata, and on a CUDA GPU
with a FlashAttention implementation its kernels against the fp32 reference over the conformance grid."""
import numpy as np
import pytest
import torch

from llmserve.backends import flash_attn
from llmserve.backends.flash_attn import FlashAttnBackend, pick
from llmserve.interfaces import AttentionSpec, BatchLayout
from llmserve.plugins.conformance import DECODE, MIXED, case_spec, check_backend, kernel_cases

SPEC = AttentionSpec(8, 2, 128, torch.bfloat16, 16)


def fake(name: str, missing: str | None = None, limits=lambda spec: []) -> flash_attn.Implementation:
    return flash_attn.Implementation(name, name, lambda *args: None, limits, lambda: missing)


def test_first_usable_implementation_is_picked_and_the_others_say_why(monkeypatch):
    monkeypatch.setattr(flash_attn, "IMPLEMENTATIONS", (
        fake("fa2", limits=lambda spec: [] if spec.block_size % 256 == 0 else ["needs 256"]),
        fake("fa4", missing="not installed: pip install --pre flash-attn-4"), fake("torch")))
    implementation, skipped = pick(SPEC)
    assert implementation.name == "torch"
    assert skipped == ["fa2: needs 256", "fa4: not installed: pip install --pre flash-attn-4"]
    assert pick(AttentionSpec(8, 2, 128, torch.bfloat16, 256))[0].name == "fa2"
    assert FlashAttnBackend.why_unsupported(SPEC, "cuda") == []
    assert FlashAttnBackend.details(SPEC, "cuda") == [
        "uses torch (not fa2: needs 256 | fa4: not installed: pip install --pre flash-attn-4)"]


def test_refused_when_no_implementation_can_run_the_model(monkeypatch):
    monkeypatch.setattr(flash_attn, "IMPLEMENTATIONS", (fake("fa4", missing="not installed: pip install x"),))
    assert FlashAttnBackend.why_unsupported(SPEC, "cuda") == [
        "no FlashAttention implementation can run it: fa4: not installed: pip install x"]
    with pytest.raises(ValueError, match="FLASH_ATTN: no FlashAttention implementation"):
        FlashAttnBackend(SPEC, torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU says")
def test_the_real_implementations_explain_themselves_here():
    """On this machine (no GPU; torch 2.13 has varlen_attn with a block table) every packaging gives its reason."""
    reasons = dict(r.split(": ", 1) for r in pick(SPEC)[1])
    fa4 = reasons["flash-attn-4 (CuTe DSL)"]
    assert fa4 in ("not installed: pip install --pre flash-attn-4", "needs a CUDA GPU") or fa4.startswith("its paged")
    if "torch varlen_attn (FlashAttention-2)" in reasons:
        assert "multiple of 256, not 16 (--block-size 256)" in reasons["torch varlen_attn (FlashAttention-2)"]
    capped = pick(AttentionSpec(8, 2, 128, torch.bfloat16, 256, logit_softcap=50.0))[1]
    assert any(r.startswith("torch varlen_attn (FlashAttention-2): ") and r.endswith("has no soft-cap") for r in capped)


def test_metadata_is_one_buffer_with_cumulative_key_lengths():
    layout = BatchLayout(np.array([3, 1, 0]), np.array([0, 40, 0]), [[7], [2, 5, 9], []],
                         torch.zeros(4, dtype=torch.int64), 16, torch.device("cpu"))
    md = FlashAttnBackend.build_metadata(FlashAttnBackend.__new__(FlashAttnBackend), layout)
    assert md.cu_seqlens_q.tolist() == [0, 3, 4, 4] and md.seqused_k.tolist() == [3, 41, 0]
    assert md.cu_seqlens_k.tolist() == [0, 3, 44, 44]
    assert md.page_table.tolist() == [[7, 0, 0], [2, 5, 9], [0, 0, 0]] and md.page_table.dtype == torch.int32
    assert md.max_query_len == 3 and md.max_seq_len == 41
    assert all(t.untyped_storage().data_ptr() == md.buffer.untyped_storage().data_ptr()
               for t in (md.cu_seqlens_q, md.seqused_k, md.cu_seqlens_k, md.page_table))


def test_graph_metadata_keeps_its_shapes_and_bounds():
    def layout(query_lens, computed, tables):
        return BatchLayout(np.array(query_lens), np.array(computed), tables, torch.zeros(2, dtype=torch.int64), 16,
                           torch.device("cpu"))

    backend = FlashAttnBackend.__new__(FlashAttnBackend)
    md = backend.build_graph_metadata(layout([1, 1], [0, 0], [[], []]), max_blocks=8)
    assert md.page_table.shape == (2, 8) and md.max_seq_len == 128 and md.max_query_len == 1
    backend.build_graph_metadata(layout([1, 1], [20, 3], [[4, 6], [1]]), 8, out=md)
    assert md.seqused_k.tolist() == [21, 4] and md.cu_seqlens_k.tolist() == [0, 21, 25]
    assert md.page_table[:, :2].tolist() == [[4, 6], [1, 0]] and md.max_seq_len == 128


gpu = pytest.mark.skipif(not torch.cuda.is_available() or FlashAttnBackend.why_unsupported(SPEC, "cuda") != [],
                         reason="needs a CUDA GPU and a FlashAttention implementation")


@gpu
@pytest.mark.parametrize("case", [c for c in kernel_cases("cuda")
                                  if not FlashAttnBackend.why_unsupported(case_spec(c), "cuda")],
                         ids=lambda c: f"{c['head_dim']}-{c['heads']}-{c['kv_heads']}-{c['block_size']}")
def test_kernels_match_reference(case):
    check_backend(FlashAttnBackend, **case)


@gpu
@pytest.mark.parametrize("block_size", [16, 64, 128])
def test_long_mixed_and_decode_batches(block_size):
    long_mixed = [(0, 552), (888, 480), (1200, 1), (0, 1), (384, 1), (1536, 216)]
    for requests in (long_mixed, [(1680, 1), (120, 1), (3120, 1), (792, 1)], MIXED, DECODE):
        check_backend(FlashAttnBackend, torch.bfloat16, 32, 8, 128, block_size, requests)
