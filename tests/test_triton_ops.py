"""The fused RMSNorm, rotary (with per-head norms) and SiLU-and-multiply kernels against the layers' torch code,
on fresh random inputs.

Without CUDA they run in Triton's interpreter; with CUDA, compiled."""
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first defined
pytest.importorskip("triton")

from llmserve.models.layers import RMSNorm, triton_ops  # noqa: E402
from llmserve.models.layers.rotary import RotaryEmbedding  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, size, offset", [(7, 64, 0.0), (3, 96, 1.0), (1, 576, 0.0)])
def test_rms_norm_matches_torch(dtype, rows, size, offset):
    norm = RMSNorm(size, 1e-6, offset).to(DEVICE, dtype)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(rows, size, device=DEVICE, dtype=dtype)
    residual = torch.randn(rows, size, device=DEVICE, dtype=dtype)
    weight = norm.weight.detach().cpu().double() + offset

    def reference(rows):  # float64 on the CPU
        return (rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + 1e-6) * weight).float()

    expected_residual = x.cpu().double() + residual.cpu().double()
    expected = reference(expected_residual)
    out = triton_ops.rms_norm(x, norm.weight, 1e-6, offset, residual)
    torch.testing.assert_close(out.cpu().float(), expected, atol=TOLERANCE[dtype] * 10, rtol=TOLERANCE[dtype] * 10)
    torch.testing.assert_close(residual.cpu().float(), expected_residual.float(), atol=TOLERANCE[dtype],
                               rtol=TOLERANCE[dtype])
    alone = triton_ops.rms_norm(x, norm.weight, 1e-6, offset, None)
    torch.testing.assert_close(alone.cpu().float(), reference(x.cpu().double()),
                               atol=TOLERANCE[dtype] * 10, rtol=TOLERANCE[dtype] * 10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, heads, kv_heads, head_dim, norms", [(5, 3, 1, 64, False), (2, 8, 2, 128, False),
                                                                      (6, 4, 2, 128, True), (3, 16, 8, 64, True)])
def test_qk_rotary_matches_torch_on_strided_views(dtype, tokens, heads, kv_heads, head_dim, norms):
    rope = RotaryEmbedding(head_dim, 256, {"rope_theta": 10000.0, "rope_type": "default"}).to(DEVICE)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE, dtype=dtype)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)  # strided views, as the models pass them
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    positions = torch.randint(0, 256, (tokens,), device=DEVICE)
    norm_pair = None
    if norms:  # different eps and offsets for q and k, as a model could have
        norm_pair = (RMSNorm(head_dim, 1e-6).to(DEVICE, dtype), RMSNorm(head_dim, 1e-2, offset=1.0).to(DEVICE, dtype))
        for norm in norm_pair:
            torch.nn.init.normal_(norm.weight)
    # The torch code, in fp32 on the CPU
    reference_norms = tuple(_float_copy(n) for n in norm_pair) if norms else None
    cos_sin = (rope.cos.cpu()[positions.cpu()].unsqueeze(1), rope.sin.cpu()[positions.cpu()].unsqueeze(1), None)
    expected_q, expected_k = RotaryEmbedding.forward(cos_sin, q.cpu().float(), k.cpu().float(), reference_norms)
    triton_ops.qk_rotary_(q, k, rope.cos, rope.sin, positions, norm_pair)
    tolerance = TOLERANCE[dtype] * 10
    torch.testing.assert_close(q.cpu().float(), expected_q, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(k.cpu().float(), expected_k, atol=tolerance, rtol=tolerance)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)  # v, beside k, is untouched


@pytest.mark.parametrize("head_dim, rotary_factor, norms", [(96, 1.0, False), (64, 0.75, False), (128, 0.5, True)])
def test_fused_rotary_partial_and_odd_head_sizes(head_dim, rotary_factor, norms):
    """Phi-3's head size 96 (half 48: no power of two) and partial rotary (Phi-4-mini) through the fused path."""
    tokens, heads, kv_heads = 5, 4, 2
    rope = RotaryEmbedding(head_dim, 256, {"rope_theta": 10000.0, "rope_type": "default",
                                           "partial_rotary_factor": rotary_factor}).to(DEVICE)
    q = torch.randn(tokens, heads, head_dim, device=DEVICE)
    k = torch.randn(tokens, kv_heads, head_dim, device=DEVICE)
    positions = torch.randint(0, 256, (tokens,), device=DEVICE)
    norm_pair = (RMSNorm(head_dim, 1e-6).to(DEVICE), RMSNorm(head_dim, 1e-6).to(DEVICE)) if norms else None
    cos_sin = (rope.cos.cpu()[positions.cpu()].unsqueeze(1), rope.sin.cpu()[positions.cpu()].unsqueeze(1), None)
    expected_q, expected_k = RotaryEmbedding.forward(
        cos_sin, q.cpu(), k.cpu(), tuple(_float_copy(n) for n in norm_pair) if norms else None)
    got_q, got_k = RotaryEmbedding.forward((rope.cos, rope.sin, positions), q.clone(), k.clone(), norm_pair)
    torch.testing.assert_close(got_q.cpu(), expected_q, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_k.cpu(), expected_k, atol=1e-4, rtol=1e-4)
    rotary_dim = int(head_dim * rotary_factor)
    if not norms:  # the dims past the rotary part pass through untouched
        assert torch.equal(got_q[..., rotary_dim:].cpu(), q[..., rotary_dim:].cpu())


def _float_copy(norm: RMSNorm) -> RMSNorm:
    copy = RMSNorm(norm.weight.shape[0], norm.eps, norm.offset)
    copy.weight.data = norm.weight.detach().float().cpu()
    return copy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, size", [(3, 64), (2, 1500)])
def test_silu_and_mul_matches_torch(dtype, tokens, size):
    x = torch.randn(tokens, 2 * size, device=DEVICE, dtype=dtype)
    gate, up = x.cpu().float().chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    out = triton_ops.silu_and_mul(x)
    tolerance = TOLERANCE[dtype] * 10
    torch.testing.assert_close(out.cpu().float(), expected, atol=tolerance, rtol=tolerance)
