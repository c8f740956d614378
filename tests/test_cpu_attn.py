"""CPU_ATTN (a C++ decode kernel over the paged cache; prefill rows through SDPA) against the plain fp32 paged-attention
reference, on the CPU, at several shapes, block sizes, windows and dtypes; the kernel alone against a float64
reference at the edges of its vector code (lengths that are not whole tiles, windows inside a block, head sizes that
its AVX2 / AVX-512 paths take or leave to the portable one, GQA groups it takes 1 to 4 at a time, long rows cut into
chunks); and the engine with it against TORCH_SDPA."""
import zlib

import pytest
import torch
from llmserve.plugins.conformance import check_backend

from llmserve import LLM, SamplingParams
from llmserve.backends.cpu_attn import CpuAttnBackend, kernel

MIXED = [(0, 23), (37, 20), (50, 1), (0, 1), (16, 1), (64, 9)]  # (cached tokens, new tokens)
DECODE = [(300, 1), (5, 1), (1000, 1), (17, 1), (0, 1), (130, 1)]

pytestmark = pytest.mark.skipif(isinstance(kernel(), Exception), reason="the C++ kernel did not build here")


@pytest.mark.parametrize("window", [None, 21])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 64), (3, 1, 96), (2, 2, 256), (9, 3, 64), (8, 1, 128)])
@pytest.mark.parametrize("requests", [MIXED, DECODE], ids=["mixed", "decode"])
def test_matches_reference(window, heads, kv_heads, head_dim, requests):
    check_backend(CpuAttnBackend, torch.float32, heads, kv_heads, head_dim, 16, requests, window, "cpu",
                  scale=0.3 if heads == 3 else None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 4, 128)])
def test_half_precision_matches_reference(dtype, block_size, heads, kv_heads, head_dim):
    check_backend(CpuAttnBackend, dtype, heads, kv_heads, head_dim, block_size, MIXED + DECODE, None, "cpu")


def decode_float64(q, key_cache, value_cache, tokens, block_table, seq_lens, scale, window):
    """Each decode row's query over its visible keys, read through its block table, in float64."""
    block_size, group = key_cache.shape[1], q.shape[1] // key_cache.shape[2]
    out = {}
    for row, (token, length) in enumerate(zip(tokens.tolist(), seq_lens.tolist())):
        pos = torch.arange(max(0, length - window) if window else 0, length)
        blocks = block_table[row, pos // block_size]
        keys = key_cache[blocks, pos % block_size].double().repeat_interleave(group, 1)
        values = value_cache[blocks, pos % block_size].double().repeat_interleave(group, 1)
        scores = torch.einsum("hd,khd->hk", q[token].double(), keys) * scale
        out[token] = torch.einsum("hk,khd->hd", scores.softmax(-1), values)
    return out


def run_kernel(dtype, heads, kv_heads, head_dim, block_size, lengths, window, q_scale=1.0):
    """The kernel on random rows of `lengths` keys (block tables from a shuffled pool, queries as views with a head
    stride, rows in a shuffled order of the flat tokens) beside the float64 reference."""
    blocks = [-(-n // block_size) for n in lengths]
    pool = torch.randperm(sum(blocks) + 2)
    table = torch.zeros(len(lengths), max(blocks), dtype=torch.int64)
    for row, start in enumerate(torch.tensor([0] + blocks).cumsum(0)[:-1].tolist()):
        table[row, :blocks[row]] = pool[start:start + blocks[row]]
    key_cache = torch.randn(len(pool), block_size, kv_heads, head_dim).to(dtype)
    value_cache = torch.randn(len(pool), block_size, kv_heads, head_dim).to(dtype)
    qkv = (torch.randn(len(lengths) + 1, heads + 2 * kv_heads, head_dim) * q_scale).to(dtype)
    q = qkv[:, :heads]
    tokens = torch.randperm(len(lengths) + 1)[:len(lengths)]
    seq_lens = torch.tensor(lengths, dtype=torch.int64)
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5
    kernel().paged_decode(out, q, key_cache, value_cache, tokens, table, seq_lens, scale, window or 0)
    expected = decode_float64(q, key_cache, value_cache, tokens, table, seq_lens, scale, window)
    return {t: out[t] for t in expected}, expected


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # half precision: the output's rounding
LENGTHS = [1, 7, 8, 15, 16, 17, 33, 100, 515]


@pytest.mark.parametrize("window", [None, 5, 21])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 4, 128), (8, 1, 80), (14, 2, 72), (6, 2, 20)],
                         ids=["group3-d64", "group1-d128", "group8-d80", "group7-d72", "group3-d20"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_kernel_matches_float64(dtype, heads, kv_heads, head_dim, block_size, window):
    torch.manual_seed(zlib.crc32(repr((dtype, heads, head_dim, block_size, window)).encode()))
    out, expected = run_kernel(dtype, heads, kv_heads, head_dim, block_size, LENGTHS, window)
    for token in expected:
        torch.testing.assert_close(out[token].double(), expected[token], atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("lengths, window", [([3000], None), ([2900, 3], 1000), ([4100, 600, 17], None)],
                         ids=["one-row", "window", "mixed"])
def test_long_rows_cut_into_chunks(lengths, window, threads):
    """Few long rows: cut into chunks of blocks across the threads, merged after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(len(lengths) + threads)
        for dtype in (torch.float32, torch.bfloat16):
            out, expected = run_kernel(dtype, 8, 2, 64, 16, lengths, window)
            for token in expected:
                torch.testing.assert_close(out[token].double(), expected[token], atol=TOLERANCE[dtype],
                                           rtol=TOLERANCE[dtype])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_scores(dtype):
    """Scores spread over hundreds: the running max moves often (the accumulators rescaled), most weights underflow."""
    torch.manual_seed(7)
    out, expected = run_kernel(dtype, 6, 2, 64, 16, [1, 40, 333, 2000], None, q_scale=40.0)
    for token in expected:
        torch.testing.assert_close(out[token].double(), expected[token], atol=TOLERANCE[dtype] * 4,
                                   rtol=TOLERANCE[dtype] * 4)


def test_the_engine_with_it_equals_torch_sdpa(llm):
    prompts = ["The capital of France is", "Once upon a time, in a land far away,", "1, 2, 3,"]
    params = SamplingParams(temperature=0, max_tokens=24)
    assert llm.engine.runner.backend.name == "CPU_ATTN"  # the CPU's default
    sdpa = LLM(dtype="float32", attention_backend="TORCH_SDPA")
    assert ([o.outputs[0].token_ids for o in sdpa.generate(prompts, params, use_tqdm=False)] ==
            [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
    sdpa.engine.shutdown()


def test_bf16_engine_decodes_as_torch_sdpa_to_the_last_bit_but_rare_roundings(monkeypatch):
    """The embedded model in bf16: every decode call's kernel output against TORCH_SDPA's (fp32 math, one rounding)
    on the same cache: equal in all but a few values in 10,000 (on a rounding boundary, or near zero after cancelling
    sums), those one bf16 step apart."""
    from llmserve.backends.torch_sdpa import TorchSdpaBackend

    calls = []
    build, forward = CpuAttnBackend.build_metadata, CpuAttnBackend.forward

    def build_both(self, batch):
        metadata = build(self, batch)
        self.sdpa = getattr(self, "sdpa", None) or TorchSdpaBackend(self.spec, torch.device("cpu"))
        metadata.sdpa_all = self.sdpa.build_metadata(batch)
        return metadata

    def forward_both(self, layer, q, k, v, kv_cache, metadata):
        out = forward(self, layer, q, k, v, kv_cache, metadata)
        rows = metadata.decode_tokens
        if len(rows):
            expected = self.sdpa.forward(layer, q, k, v, kv_cache, metadata.sdpa_all)[rows].float()
            calls.append(((out[rows].float() - expected).abs(), expected))
        return out

    monkeypatch.setattr(CpuAttnBackend, "build_metadata", build_both)
    monkeypatch.setattr(CpuAttnBackend, "forward", forward_both)
    monkeypatch.setattr(CpuAttnBackend, "max_kernel_query", 1)  # SDPA attends in fp32 for decode rows only
    llm = LLM(dtype="bfloat16")
    llm.generate(["The capital of France is", "def fibonacci(n):"], SamplingParams(temperature=0, max_tokens=12),
                 use_tqdm=False)
    llm.engine.shutdown()
    assert len(calls) > 100
    differing = sum(int((d > 0).sum()) for d, _ in calls) / sum(d.numel() for d, _ in calls)
    assert differing < 1e-3, differing
    for d, expected in calls:  # values near zero come out of cancelling sums: bounded by the call's largest value
        assert (d <= (expected.abs() + 2**-6 * expected.abs().max()) * 2**-7).all()


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 64), (9, 3, 64)])
def test_short_chunks_through_the_kernel_match_reference(window, dtype, heads, kv_heads, head_dim):
    """A chunk of a few new tokens over cached ones: each token a kernel row seeing the keys up to itself (MIXED's
    chunks of 1 and 9 tokens through the kernel, those of 20 and 23 through SDPA)."""
    check_backend(CpuAttnBackend, dtype, heads, kv_heads, head_dim, 16, MIXED + DECODE, window, "cpu",
                  configure=lambda backend: setattr(backend, "max_kernel_query", 9))


def test_a_kernel_that_does_not_build_leaves_the_default_to_torch_sdpa(monkeypatch):
    """prepare()'s reasons: the CPU's default moves on to TORCH_SDPA; an explicit request fails with them."""
    from llmserve.interfaces import AttentionSpec
    from llmserve.plugins.platforms import CpuPlatform
    from llmserve.plugins.select import select_attention_backend

    spec = AttentionSpec(4, 2, 64, torch.float32, 16)
    assert select_attention_backend(None, spec, CpuPlatform).name == "CPU_ATTN"
    monkeypatch.setattr(CpuAttnBackend, "prepare", classmethod(lambda cls: ["its C++ kernel did not build (test)"]))
    assert select_attention_backend(None, spec, CpuPlatform).name == "TORCH_SDPA"
    with pytest.raises(ValueError, match=r"^attention backend CPU_ATTN cannot run this model here: its C\+\+ kernel "
                                         r"did not build \(test\)"):
        select_attention_backend("CPU_ATTN", spec, CpuPlatform)
