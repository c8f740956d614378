"""The W8A16 Triton kernel (quantization/triton_fp8.py: fp8 weights times a few 16-bit rows) against a float64
reference on fresh random inputs: in Triton's interpreter on the CPU at small shapes, compiled on a CUDA GPU at
Llama-3.1-8B's shapes, and fp8_linear choosing it for decode-sized batches there."""
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first defined
pytest.importorskip("triton")

from llmserve.quantization import triton_fp8  # noqa: E402
from llmserve.quantization.fp8 import fp8_linear, quantize_rows  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # ||out - ref|| / ||ref||: rounding


def check(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, config=None) -> None:
    torch.manual_seed(m * 1000 + n + k)
    weight, scale = quantize_rows(torch.randn(n, k, device=DEVICE) * 0.05)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    expected = x.double() @ (weight.double() * scale.double()).T + (b.double() if bias else 0)
    out = triton_fp8.fp8_gemv(x, weight, scale, b, config)
    assert out.dtype == dtype and out.shape == (m, n)
    error = ((out.double() - expected).norm() / expected.norm()).item()
    assert error < TOLERANCE[dtype], error


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m, n, k", [(1, 16, 256), (1, 40, 300), (2, 33, 64), (3, 17, 129), (4, 64, 520)])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_kernel_matches_float64_reference(m, n, k, dtype, bias):
    """Rows and columns that are not whole blocks (masked edges), K not a multiple of BLOCK_K, 3 rows in a block of 4."""
    check(m, n, k, dtype, bias)


@pytest.mark.parametrize("config", [triton_fp8.GemvConfig(4, 64, 4, triton_fp8.SUM_AT_END),
                                    triton_fp8.GemvConfig(8, 32, 4, triton_fp8.SUM_PER_STEP),
                                    triton_fp8.GemvConfig(32, 128, 8, triton_fp8.SUM_AT_END),
                                    triton_fp8.GemvConfig(16, 64, 4, triton_fp8.MMA),
                                    triton_fp8.GemvConfig(32, 128, 4, triton_fp8.MMA, 4)], ids=str)
@pytest.mark.parametrize("m", [1, 3])
def test_every_block_form(m, config):
    """Every form (two ways of summing on CUDA cores, tensor cores) and other block sizes than gemv_config's
    (benchmarks/fp8_gemv.py sweeps them)."""
    check(m, 37, 300, torch.bfloat16, bias=True, config=config)


def test_strided_rows():
    torch.manual_seed(0)
    weight, scale = quantize_rows(torch.randn(24, 96, device=DEVICE))
    x = torch.randn(2, 200, device=DEVICE)[:, 8:104]  # rows 200 apart
    expected = x.double() @ (weight.double() * scale.double()).T
    torch.testing.assert_close(triton_fp8.fp8_gemv(x, weight, scale, None).double(), expected, rtol=1e-5, atol=1e-5)


cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")


@cuda_only
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
def test_kernel_at_llama_8b_shapes(m, n, k):
    check(m, n, k, torch.bfloat16, bias=False)


@cuda_only
def test_fp8_linear_takes_the_kernel_for_decode_batches_only(monkeypatch):
    torch.manual_seed(1)
    weight, scale = quantize_rows(torch.randn(256, 512, device="cuda") * 0.05)
    calls = []
    kernel = triton_fp8.fp8_gemv
    monkeypatch.setattr(triton_fp8, "fp8_gemv", lambda *args: calls.append(args[0].shape[0]) or kernel(*args))
    for m in (1, triton_fp8.GEMV_MAX_ROWS, triton_fp8.GEMV_MAX_ROWS + 1, 64):
        x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        expected = x.double() @ (weight.double() * scale.double()).T
        out = fp8_linear(x, weight, scale, None)
        assert ((out.double() - expected).norm() / expected.norm()).item() < 3e-2  # W8A8 above: activations in fp8
    assert calls == [1, triton_fp8.GEMV_MAX_ROWS]
