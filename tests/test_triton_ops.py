"""The fused RMSNorm and rotary kernels against the layers' torch code, on fresh random inputs.

Without CUDA they run in Triton's interpreter; with CUDA, compiled."""
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first defined
pytest.importorskip("triton")

from llmserve.models.layers import RMSNorm, triton_ops  # noqa: E402
from llmserve.models.layers.rotary import RotaryEmbedding, rotate  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, size, offset", [(7, 64, 0.0), (3, 96, 1.0), (1, 576, 0.0)])
def test_rms_norm_matches_torch(dtype, rows, size, offset):
    norm = RMSNorm(size, 1e-6, offset).to(DEVICE, dtype)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(rows, size, device=DEVICE, dtype=dtype)
    residual = torch.randn(rows, size, device=DEVICE, dtype=dtype)
    reference = RMSNorm(size, 1e-6, offset)  # the torch code, in fp32 on the CPU
    reference.weight.data = norm.weight.detach().float().cpu()
    expected, expected_residual = reference(x.cpu().float(), residual.cpu().float())
    out = triton_ops.rms_norm(x, norm.weight, 1e-6, offset, residual)
    torch.testing.assert_close(out.cpu().float(), expected, atol=TOLERANCE[dtype] * 10, rtol=TOLERANCE[dtype] * 10)
    torch.testing.assert_close(residual.cpu().float(), expected_residual, atol=TOLERANCE[dtype],
                               rtol=TOLERANCE[dtype])
    alone = triton_ops.rms_norm(x, norm.weight, 1e-6, offset, None)
    torch.testing.assert_close(alone.cpu().float(), reference(x.cpu().float()),
                               atol=TOLERANCE[dtype] * 10, rtol=TOLERANCE[dtype] * 10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, heads, head_dim", [(5, 3, 64), (2, 8, 128)])
def test_rotary_matches_torch_on_strided_views(dtype, tokens, heads, head_dim):
    rope = RotaryEmbedding(head_dim, 256, {"rope_theta": 10000.0, "rope_type": "default"}).to(DEVICE)
    qkv = torch.randn(tokens, (2 * heads + 1) * head_dim, device=DEVICE, dtype=dtype)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)  # a strided view, as the models pass it
    positions = torch.randint(0, 256, (tokens,), device=DEVICE)
    cos, sin = rope.cos[positions].unsqueeze(1), rope.sin[positions].unsqueeze(1)
    expected = rotate(q.float(), cos.float(), sin.float())
    triton_ops.rotary_(q, rope.cos, rope.sin, positions)
    torch.testing.assert_close(q.float(), expected, atol=TOLERANCE[dtype] * 10, rtol=TOLERANCE[dtype] * 10)
