import math

import torch
from torch import nn

from llmserve.models.layers import triton_ops


def rope_parameters(hf_config) -> dict:
    """Rope settings from either transformers 5 (`rope_parameters`) or 4 (`rope_theta` + `rope_scaling`)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def inverse_frequencies(head_dim: int, params: dict) -> torch.Tensor:
    inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = params["rope_type"]
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / params["factor"]
    if kind == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        between = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(between, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    raise ValueError(f"rope_type {kind!r} is not supported (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the HF (rotate-half) layout, over flat [tokens, heads, head_dim]."""

    def __init__(self, head_dim: int, max_positions: int, params: dict) -> None:
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), inverse_frequencies(head_dim, params))
        self.register_buffer("cos", freqs.cos().float(), persistent=False)
        self.register_buffer("sin", freqs.sin().float(), persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple:
        """The rotation of each token, computed once per step and shared by all layers: [T, 1, head_dim / 2]
        cos and sin, or on a GPU the whole tables and the positions, for the fused kernel."""
        if triton_ops.fused(positions):
            return self.cos, self.sin, positions
        return self.cos.index_select(0, positions).unsqueeze(1), self.sin.index_select(0, positions).unsqueeze(1), None

    @staticmethod
    def forward(cos_sin: tuple, q: torch.Tensor, k: torch.Tensor, norms: tuple | None = None):
        """Rotate q and k ([T, heads, head_dim]) by the per-token rotation from cos_sin() (in place on a GPU);
        `norms`: an RMSNorm for q's heads and one for k's, applied to each head first (Qwen3)."""
        cos, sin, positions = cos_sin
        if positions is not None:
            triton_ops.qk_rotary_(q, k, cos, sin, positions, norms)
            return q, k
        if norms:
            q, k = norms[0](q), norms[1](k)
        return rotate(q, cos, sin), rotate(k, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
