"""The CPU layer kernels (models/layers/cpu_ops.py: RMSNorm with the residual add, SiLU-and-multiply, q/k rotary)
against fp64 references at several shapes and dtypes, with fresh random inputs; and the layers choosing them on the
CPU."""
import pytest
import torch

from llmserve.models.layers import RMSNorm, RotaryEmbedding, cpu_ops, silu_and_mul
from llmserve.models.layers.fused import kernels_for

pytestmark = pytest.mark.skipif(isinstance(cpu_ops.kernel(), Exception), reason="the C++ kernels did not build here")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# what one rounding to the dtype allows, relative to the values' size
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    scale = want.abs().max().item() + 1e-6
    error = (got.double() - want).abs().max().item()
    assert error <= 2 * TOLERANCE[dtype] * scale, f"{dtype}: largest error {error:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,size", [(1, 576), (33, 64), (130, 1000), (5, 7)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, rows, size, offset, with_residual):
    x, residual = torch.randn(rows, size, dtype=dtype), torch.randn(rows, size, dtype=dtype)
    weight = torch.randn(size, dtype=dtype)
    summed = x.double() + residual.double() if with_residual else x.double()
    summed = summed.to(dtype).double()  # the sum is rounded to the dtype, as the model's residual stream is
    want = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-5) * (weight.double() + offset)
    res = residual.clone() if with_residual else None
    got = cpu_ops.rms_norm(x, weight, 1e-5, offset, res)
    close(got, want, dtype)
    if with_residual:
        assert torch.equal(res.double(), summed), "the residual must hold x + residual"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,size", [(1, 1536), (17, 64), (64, 100), (3, 5)])
def test_silu_and_mul(dtype, tokens, size):
    x = torch.randn(tokens, 2 * size, dtype=dtype) * 4  # past the exp's easy range
    gate, up = x.double().chunk(2, dim=-1)
    close(cpu_ops.silu_and_mul(x), gate * torch.sigmoid(gate) * up, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim,rotary_dim", [(1, 9, 3, 64, 64), (40, 4, 2, 128, 128),
                                                                      (7, 3, 1, 64, 32), (5, 2, 2, 24, 24)])
def test_qk_rotary_in_place(dtype, tokens, heads, kv_heads, head_dim, rotary_dim):
    positions = torch.randint(0, 500, (tokens,))
    angles = torch.rand(500, rotary_dim // 2) * 6.3
    cos, sin = angles.cos(), angles.sin()
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)  # q and k: strided views, as in models
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()

    def rotated(x):
        x = x.double()
        c, s = cos.double()[positions].unsqueeze(1), sin.double()[positions].unsqueeze(1)
        x1, x2, rest = x[..., :rotary_dim // 2], x[..., rotary_dim // 2:rotary_dim], x[..., rotary_dim:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)

    want_q, want_k = rotated(q), rotated(k)
    cpu_ops.qk_rotary_(q[..., :rotary_dim], k[..., :rotary_dim], cos, sin, positions)
    close(q, want_q, dtype)
    close(k, want_k, dtype)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before), "v must be left alone"


def test_layers_use_the_kernels_on_the_cpu():
    x = torch.randn(4, 64)
    assert kernels_for(x) is cpu_ops
    norm = RMSNorm(64, 1e-6)
    torch.nn.init.normal_(norm.weight)
    want = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    close(norm(x), want, torch.float32)
    gate_up = torch.randn(4, 128)
    close(silu_and_mul(gate_up), torch.nn.functional.silu(gate_up.double()[:, :64]) * gate_up.double()[:, 64:],
          torch.float32)
    rotary = RotaryEmbedding(64, 128, {"rope_type": "default", "rope_theta": 10000.0})
    positions = torch.tensor([0, 5, 127, 3])
    cos_sin = rotary.cos_sin(positions)
    assert cos_sin[2] is positions, "on the CPU the fused kernel takes the whole tables and the positions"
    q, k = torch.randn(4, 2, 64), torch.randn(4, 1, 64)
    angles = positions.double()[:, None] * (10000.0 ** (-torch.arange(0, 64, 2).double() / 64))
    c, s = angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)
    want_q = torch.cat([q.double()[..., :32] * c - q.double()[..., 32:] * s,
                        q.double()[..., 32:] * c + q.double()[..., :32] * s], dim=-1)
    got_q, _ = rotary(cos_sin, q, k)
    close(got_q, want_q, torch.float32)
