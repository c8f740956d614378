"""TRITON_ATTN's kernels against a plain fp32 reference (gather each request's keys and values, masked softmax).

Without CUDA they run in Triton's interpreter at small shapes; with CUDA, compiled, at larger ones.
"""
import os

import numpy as np
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # triton reads it when the kernels are defined: on first use
pytest.importorskip("triton")

from llmserve.plugins.conformance import check_backend  # noqa: E402
from llmserve.backends.rocm_attn import RocmAttnBackend, amd_tile_config  # noqa: E402
from llmserve.backends.triton_attn import TritonAttnBackend, next_pow2, write_kv  # noqa: E402
from llmserve.interfaces import AttentionSpec, BatchLayout  # noqa: E402

GPU = DEVICE == "cuda"
SCALE = 24 if GPU else 1  # contexts and prefill chunks grow by this factor on a GPU
MIXED = [(0, 23), (37, 20), (50, 1), (0, 1), (16, 1), (64, 9), (0, 0)]  # (cached tokens, new tokens); last: padding
DECODE = [(70, 1), (5, 1), (130, 1), (33, 1)]


def scaled(requests: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(c * SCALE, n * SCALE if n > 1 else n) for c, n in requests]


def run_case(dtype, heads, kv_heads, head_dim, block_size, requests, window=None, segments=None,
             backend_cls=TritonAttnBackend, **kwargs):
    def configure(backend: TritonAttnBackend) -> None:
        backend.kv_segments = segments

    check_backend(backend_cls, dtype, heads, kv_heads, head_dim, block_size, requests, window, DEVICE, configure,
                  **kwargs)


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("segments", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mixed_batch_gqa(device, segments, dtype):
    heads, kv_heads = (32, 8) if GPU else (4, 2)
    run_case(dtype, heads, kv_heads, 64, 16, scaled(MIXED), segments=segments)


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("segments", [1, 4])
def test_decode_mqa(device, segments):
    run_case(torch.bfloat16, 16 if GPU else 4, 1, 128, 32, scaled(DECODE), segments=segments)


@pytest.mark.parametrize("device", [DEVICE])
def test_mha_head_256_fp16(device):
    heads = 16 if GPU else 2
    run_case(torch.float16, heads, heads, 256, 16, scaled([(20, 12), (33, 1), (0, 5)]))


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("segments", [1, 2])
@pytest.mark.parametrize("block_size", [16, 32])
def test_sliding_window(device, segments, block_size):
    heads, kv_heads = (32, 8) if GPU else (6, 2)
    requests = scaled([(45, 30), (80, 1), (0, 40), (100, 17)])
    run_case(torch.bfloat16 if GPU else torch.float32, heads, kv_heads, 128, block_size, requests,
             window=21 * SCALE, segments=segments)


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("segments", [1, 4])
@pytest.mark.parametrize("head_dim", [96, 80])
def test_head_size_not_a_power_of_two(device, segments, head_dim):
    """Phi-3's 96 and 80: the kernels pad the head to a power of two with zeros."""
    heads, kv_heads = (32, 8) if GPU else (4, 2)
    run_case(torch.bfloat16 if GPU else torch.float32, heads, kv_heads, head_dim, 16, scaled(MIXED),
             segments=segments)
    run_case(torch.bfloat16 if GPU else torch.float32, heads, kv_heads, head_dim, 32, scaled(DECODE),
             window=40 * SCALE, segments=segments)


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("segments", [1, 2])
def test_softcap_and_model_scale(device, segments):
    """Gemma 2's soft-capped scores (cap 50 and a small cap that bends most scores) with a scale not 1/sqrt(d)."""
    heads, kv_heads = (16, 8) if GPU else (4, 2)
    requests = scaled([(45, 30), (80, 1), (0, 40)])
    for softcap in (50.0, 2.0):
        run_case(torch.bfloat16 if GPU else torch.float32, heads, kv_heads, 64, 16, requests, window=21 * SCALE,
                 segments=segments, softcap=softcap, scale=0.3)


@pytest.mark.skipif(not GPU, reason="fp16/bf16 at every head size: realistic shapes need a GPU")
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("window", [None, 500])
def test_gpu_head_sizes_and_dtypes(head_dim, dtype, window):
    run_case(dtype, 32, 8, head_dim, 16, scaled(MIXED), window=window)
    run_case(dtype, 32, 8, head_dim, 32, scaled(DECODE), window=window)


def test_heuristic_splits_only_long_decodes_that_leave_the_gpu_idle():
    backend = TritonAttnBackend(AttentionSpec(32, 8, 128, torch.bfloat16, 16), torch.device("cpu"))
    assert backend.num_segments(num_reqs=2, max_query_len=1, max_seq_len=32768) == 16
    assert backend.num_segments(num_reqs=2, max_query_len=1, max_seq_len=1000) == 1  # too short to pay off
    assert backend.num_segments(num_reqs=64, max_query_len=1, max_seq_len=32768) == 1  # the GPU is full already
    assert backend.num_segments(num_reqs=2, max_query_len=512, max_seq_len=32768) == 1  # prefill: enough tiles


def test_metadata_is_packed_and_padded():
    backend = TritonAttnBackend(AttentionSpec(4, 2, 64, torch.float32, 16), torch.device(DEVICE))
    layout = BatchLayout(np.array([3, 1, 0]), np.array([0, 40, 0]), [[7], [2, 5, 9], []],
                         torch.zeros(4, dtype=torch.int64), 16, torch.device(DEVICE))
    md = backend.build_metadata(layout)
    assert md.query_start_loc.tolist() == [0, 3, 4, 4] and md.seq_lens.tolist() == [3, 41, 0]
    assert md.block_table.tolist() == [[7, 0, 0], [2, 5, 9], [0, 0, 0]]
    assert md.block_table.dtype == torch.int32 and md.max_query_len == 3 and md.max_seq_len == 41
    assert md.block_table.untyped_storage().data_ptr() == md.seq_lens.untyped_storage().data_ptr()  # one copy


@pytest.mark.parametrize("device", [DEVICE])
def test_write_kv_skips_negative_slots(device):
    block_size, kv_heads, head_dim, num_blocks = 16, 3, 64, 5
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, device=DEVICE).to(torch.bfloat16)
    qkv = torch.randn(7, 2 * kv_heads + 1, head_dim, device=DEVICE).to(torch.bfloat16)
    k, v = qkv[:, 1:1 + kv_heads], qkv[:, 1 + kv_heads:]  # strided views, as split from a fused projection
    slots = torch.tensor([17, 0, -1, 79, 40, -1, 63], device=DEVICE)
    expected = cache.clone()
    keep = slots >= 0
    expected[0].view(-1, kv_heads, head_dim)[slots[keep]] = k[keep]
    expected[1].view(-1, kv_heads, head_dim)[slots[keep]] = v[keep]
    write_kv(k, v, cache, slots)
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("case", ["mixed-gqa", "decode-mqa-split", "head-256-fp16", "window", "softcap", "head-96"])
def test_rocm_attn_launch_settings(device, case):
    """ROCM_ATTN's AMD tile settings through the same kernels (in the interpreter here: never run on AMD hardware)."""
    rocm = dict(backend_cls=RocmAttnBackend)
    heads, kv_heads = (32, 8) if GPU else (4, 2)
    dtype = torch.bfloat16 if GPU else torch.float32
    {"mixed-gqa": lambda: run_case(dtype, heads, kv_heads, 64, 16, scaled(MIXED), **rocm),
     "decode-mqa-split": lambda: run_case(torch.bfloat16, heads, 1, 128, 32, scaled(DECODE), segments=4, **rocm),
     "head-256-fp16": lambda: run_case(torch.float16, 2, 2, 256, 16, scaled([(20, 12), (33, 1), (0, 5)]), **rocm),
     "window": lambda: run_case(dtype, heads, kv_heads, 128, 16, scaled(MIXED), window=21 * SCALE, **rocm),
     "softcap": lambda: run_case(dtype, heads, kv_heads, 64, 16, scaled(MIXED), softcap=2.0, scale=0.3, **rocm),
     "head-96": lambda: run_case(dtype, heads, kv_heads, 96, 16, scaled(MIXED), **rocm)}[case]()


def test_amd_tiles_fit_the_lds_and_the_matrix_cores():
    for head_dim in (64, 96, 128, 256):
        for itemsize in (2, 4):
            for decode in (True, False):
                cfg = amd_tile_config(head_dim, 4, itemsize, decode)
                assert cfg.block_m >= 16 and cfg.tile_n >= 16 and cfg.num_warps == 4
                lds = (cfg.block_m + 2 * cfg.tile_n * cfg.num_stages) * next_pow2(head_dim) * itemsize
                assert lds <= 64 << 10, (head_dim, itemsize, decode, cfg)


def test_rocm_attn_is_refused_off_rocm():
    spec = AttentionSpec(8, 2, 128, torch.bfloat16, 16)
    assert RocmAttnBackend.why_unsupported(spec, "cpu") == ["runs on rocm, not on the cpu platform"]
    assert RocmAttnBackend.why_unsupported(spec, "cuda") == ["runs on rocm, not on the cuda platform"]
    assert RocmAttnBackend.why_unsupported(spec, "rocm") == []


FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("case", ["mixed-gqa-fp32", "mixed-gqa-bf16-split", "decode-mqa-split", "window-softcap",
                                  "head-96-fp16"])
def test_fp8_cache(device, case):
    """An fp8 cache with a scale for K and one for V (check_scaled_cache): the write kernel stores what torch's
    quantization gives, bit for bit; the attention kernel, decode and prefill, matches the fp32 reference over the
    dequantized cache and stays within fp8's error of the unquantized attention. In the interpreter the write kernel
    rounds to the e4m3 grid itself (round_to_e4m3: the interpreter's own conversion drops a carry)."""
    heads, kv_heads = (32, 8) if GPU else (4, 2)
    bf16 = torch.bfloat16
    {"mixed-gqa-fp32": lambda: run_case(torch.float32 if not GPU else bf16, heads, kv_heads, 64, 16, scaled(MIXED),
                                        kv_cache_dtype=FP8),
     "mixed-gqa-bf16-split": lambda: run_case(bf16, heads, kv_heads, 128, 32, scaled(MIXED), segments=2,
                                              kv_cache_dtype=FP8),
     "decode-mqa-split": lambda: run_case(bf16, heads, 1, 128, 16, scaled(DECODE), segments=4, kv_cache_dtype=FP8),
     "window-softcap": lambda: run_case(bf16, heads, kv_heads, 64, 16, scaled([(45, 30), (80, 1), (0, 40)]),
                                        window=21 * SCALE, softcap=2.0, scale=0.3, kv_cache_dtype=FP8),
     "head-96-fp16": lambda: run_case(torch.float16, heads, kv_heads, 96, 16, scaled(MIXED),
                                      kv_cache_dtype=FP8)}[case]()


@pytest.mark.parametrize("device", [DEVICE])
def test_write_kv_fp8_rounds_and_saturates_as_torch(device):
    """Round to nearest even at every binade (ties, a mantissa that carries into the next power of two, subnormals)
    and saturation at +-448 times the scale, against torch's conversion."""
    kv_heads, head_dim = 2, 16
    ties = [1.0625, 1.1875, -1.0625, 127.4, 127.9, -240.5, 0.001, 0.00293, 5e-4, 0.0, 447.0, 464.0, 1e6, -1e6, 300.0,
            2.0 ** -10]
    k = torch.tensor(ties, device=DEVICE).repeat(kv_heads, 1)[None].repeat(3, 1, 1)
    v = torch.randn(3, kv_heads, head_dim, device=DEVICE) * 50
    cache = torch.zeros(2, 2, 16, kv_heads, head_dim, dtype=FP8, device=DEVICE)
    slots = torch.tensor([3, -1, 20], device=DEVICE)
    for k_scale in (1.0, 0.37):
        scales = torch.tensor([k_scale], device=DEVICE), torch.tensor([0.11], device=DEVICE)
        write_kv(k, v, cache, slots, *scales)
        for i, x in enumerate((k, v)):
            expected = (x[[0, 2]] / scales[i]).clamp(-448, 448).to(FP8).view(torch.uint8)
            assert torch.equal(cache.view(torch.uint8)[i].view(-1, kv_heads, head_dim)[[3, 20]], expected)
    assert cache.view(torch.uint8)[:, 0, 1].eq(0).all()  # slot -1 is not written


def test_fp8_cache_is_refused_where_triton_cannot_run_it():
    spec = AttentionSpec(8, 2, 128, torch.bfloat16, 16, kv_cache_dtype=FP8)
    assert TritonAttnBackend.why_unsupported(spec, "rocm") == [
        "does not support kv_cache_dtype float8_e4m3fn on ROCm: untested there (MI300's own fp8 is e4m3fnuz)"]
    assert RocmAttnBackend.why_unsupported(spec, "rocm") == TritonAttnBackend.why_unsupported(spec, "rocm")
    if GPU and torch.cuda.get_device_capability() >= (8, 9):
        assert TritonAttnBackend.why_unsupported(spec, "cuda") == []


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("segments", [1, 4])
@pytest.mark.parametrize("window", [None, 21])
def test_attention_sinks(device, segments, window):
    """gpt-oss's sinks start segment 0's sums (weight 1, no value); split segments merge them once."""
    heads, kv_heads = (64, 8) if GPU else (4, 2)
    run_case(torch.bfloat16, heads, kv_heads, 64, 16, scaled(MIXED), window=window, segments=segments, sinks=True)
    run_case(torch.bfloat16, heads, kv_heads, 64, 16, scaled(DECODE), segments=segments, sinks=True,
             kv_cache_dtype=torch.float8_e4m3fn)
