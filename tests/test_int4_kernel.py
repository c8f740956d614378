"""The W4A16 Triton kernel (quantization/triton_int4.py) against a float64 reference computed from the 4-bit values
this test packs itself, on fresh random inputs: in Triton's interpreter on the CPU (small shapes), compiled on a
CUDA GPU (Llama-3.1-8B's shapes, and the GPTQ method's GPU path end to end).

The interpreter's bf16 dot is wrong (triton 3.9: it reads bf16 operands as garbage): under it the kernel multiplies
the same bf16-rounded operands in fp32, so bf16 here tests the loads, stores, conversions and indexing, and the bf16
MMA itself runs only on the GPU."""
import os

import pytest
import torch
import torch.nn.functional as F

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first defined
pytest.importorskip("triton")

from llmserve.quantization import triton_int4  # noqa: E402
from llmserve.quantization.triton_int4 import TileConfig  # noqa: E402

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}  # ||out - ref|| / ||ref||: output rounding, bf16 operands
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")


def random_int4(n: int, k: int, group_size: int, act_order: bool, dtype: torch.dtype, device: str = DEVICE):
    """Packed tensors (qweight [n, k/8] int32, scales, zeros uint8 0..16, g_idx or None) and the float64 weight."""
    groups = k // group_size if group_size > 0 else 1
    q = torch.randint(0, 16, (n, k), device=device)
    words = torch.zeros(n, k // 8, dtype=torch.int64, device=device)
    for j in range(8):  # feature 8w + j in bits 4j..4j+3 of word w
        words |= q[:, j::8] << (4 * j)
    qweight = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    zeros = torch.randint(0, 17, (n, groups), dtype=torch.uint8, device=device)
    scales = (torch.rand(n, groups, device=device) * 0.02 + 0.001).to(dtype)
    group_of = torch.arange(k, device=device) * groups // k
    g_idx = None
    if act_order:
        group_of = group_of[torch.randperm(k, device=device)]
        g_idx = group_of.to(torch.int32)
    weight = (q - zeros.long()[:, group_of]).double() * scales.double()[:, group_of]
    return (qweight, scales, zeros, g_idx), weight


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.isfinite().all()
    return ((out.double() - ref).norm() / ref.norm()).item()


def check(m, n, k, group_size, act_order, bias, dtype, config=None):
    packed, weight = random_int4(n, k, group_size, act_order, dtype)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    ref = x.double() @ weight.T + (b.double() if bias else 0)
    out = triton_int4.int4_linear(x, *packed, bias=b, config=config)
    assert out.shape == (m, n) and out.dtype == dtype
    assert relative_error(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype, bias", [(torch.float16, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("k, n", [(64, 48), (128, 32)])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_kernel_matches_float64_reference(m, k, n, group_size, act_order, bias, dtype):
    check(m, n, k, group_size, act_order, bias, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, k, group_size, config", [
    (1, 96, 32, TileConfig(1, 16, 32, 2, 4, 1)),  # GEMV, split-K over 3 K tiles
    (1, 192, 32, TileConfig(1, 16, 128, 1, 4, 1)),  # GEMV, 4 groups per tile, a K tail (192 = 128 + 64)
    (1, 128, 64, TileConfig(16, 16, 128, 1, 4, 1)),  # one row through the MMA form
    (5, 256, 128, TileConfig(16, 16, 128, 2, 4, 1)),  # one group per tile: scaled after the MMAs; split-K
    (40, 192, 32, TileConfig(32, 32, 128, 2, 4, 1)),  # several row tiles, 4 groups per tile, a K tail
])
@pytest.mark.parametrize("act_order", [False, True])
def test_forced_tile_configs(m, k, group_size, config, act_order, dtype):
    check(m, 48, k, group_size, act_order, True, dtype, config)


@pytest.mark.parametrize("act_order", [False, True])
def test_long_prefill_multiplies_a_dequantized_weight(act_order):
    check(triton_int4.DEQUANTIZE_ABOVE_M + 1, 32, 64, 32, act_order, True, torch.bfloat16)
    packed, weight = random_int4(40, 96, 32, act_order, torch.float16)
    assert torch.equal(triton_int4.dequantize(*packed, torch.float32), weight.float())  # exact: fp16 scales


@pytest.mark.parametrize("m", [1, 3])
def test_groups_splitting_packed_words(m):
    """A group size that is no multiple of 8 (12): read through a g_idx made for it."""
    check(m, 16, 48, 12, False, True, torch.float16)


def test_leading_dims_and_strided_rows():
    packed, weight = random_int4(32, 64, 32, False, torch.float16)
    x = torch.randn(2, 3, 128, device=DEVICE).to(torch.float16)[..., :64]  # rows 128 apart
    out = triton_int4.int4_linear(x, *packed)
    assert out.shape == (2, 3, 32)
    assert relative_error(out, x.double() @ weight.T) < TOLERANCE[torch.float16]


@cuda_only
@pytest.mark.parametrize("m", [1, 16, 512])
@pytest.mark.parametrize("n, k", [(4096, 4096), (14336, 4096), (4096, 14336)])
def test_llama_8b_shapes_on_gpu(m, n, k):
    """Against torch's matmul of the dequantized weight (bf16, group 128; act-order at one size)."""
    for act_order in [False] + ([True] if m == 16 else []):
        packed, weight = random_int4(n, k, 128, act_order, torch.bfloat16)
        x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
        expected = F.linear(x, weight.to(torch.bfloat16))
        out = triton_int4.int4_linear(x, *packed)
        torch.cuda.synchronize()
        assert relative_error(out, expected.double()) < 1e-2


@cuda_only
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_method_runs_the_kernel_on_gpu(act_order):
    """Int4Method on "cuda": g_idx kept for act-order, dropped (its rank's scale columns kept) without it."""
    from llmserve.models.layers.linear import Linear
    from llmserve.quantization.int4 import GptqMethod

    method = GptqMethod({"bits": 4, "group_size": 32}, torch.bfloat16, "cuda")
    layer = Linear(128, 64, bias=False, device=DEVICE, dtype=torch.bfloat16)
    layer.quant = method
    method.create_weights(layer)
    (qweight, scales, zeros, g_idx), weight = random_int4(64, 128, 32, act_order, torch.bfloat16)
    layer.qweight.data.copy_(qweight)
    layer.scales.data.copy_(scales)
    layer.qzeros.data.copy_(zeros)
    layer.g_idx.data.copy_(g_idx if act_order else torch.arange(128, device=DEVICE) // 32)
    method.process_weights(layer)
    assert hasattr(layer, "g_idx") == act_order
    x = torch.randn(5, 128, device=DEVICE, dtype=torch.bfloat16)
    assert relative_error(layer(x), x.double() @ weight.T) < TOLERANCE[torch.bfloat16]
