import math

import torch
from torch import nn

from llmserve.models.layers.fused import kernels_for


def rope_parameters(hf_config, layer_type: str | None = None) -> dict:
    """Rope settings from either transformers 5 (`rope_parameters`, per layer type for Gemma 3) or 4 (`rope_theta` +
    `rope_scaling`, `rope_local_base_freq` for Gemma 3's sliding layers)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    elif layer_type == "sliding_attention" and getattr(hf_config, "rope_local_base_freq", None):
        params = {"rope_type": "default", "rope_theta": hf_config.rope_local_base_freq}
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None) or 1.0)
    params.setdefault("max_position_embeddings", hf_config.max_position_embeddings)
    if getattr(hf_config, "original_max_position_embeddings", None):
        params.setdefault("original_max_position_embeddings", hf_config.original_max_position_embeddings)
    return params


def inverse_frequencies(rotary_dim: int, params: dict, factors=None) -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    inv_freq = 1.0 / (params["rope_theta"] ** exponents)
    kind = params["rope_type"]
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / params["factor"]
    if kind == "longrope":  # per-frequency stretch factors
        return inv_freq / torch.tensor(factors, dtype=torch.float64)
    if kind == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        between = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(between, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    if kind == "yarn":  # fast-turning dims keep their frequency, slow ones are interpolated, a linear ramp between
        factor, original = params["factor"], params["original_max_position_embeddings"]
        base = params["rope_theta"]

        def dim_of(rotations: float) -> float:  # the dim that turns `rotations` times over the original length
            return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = dim_of(params.get("beta_fast") or 32), dim_of(params.get("beta_slow") or 1)
        if params.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rotary_dim - 1)
        ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float64) - low) / ((high - low) or 0.001)).clamp(0, 1)
        return inv_freq / factor * ramp + inv_freq * (1 - ramp)
    raise ValueError(f"rope_type {kind!r} is not supported (supported: default, linear, llama3, longrope, yarn)")


def yarn_attention_factor(params: dict) -> float:
    """YaRN's scale of cos and sin: the config's `attention_factor`, else 0.1 ln(factor) + 1 (with DeepSeek's
    `mscale` / `mscale_all_dim`, their ratio)."""
    if params.get("attention_factor"):
        return params["attention_factor"]

    def mscale(factor: float, scale: float = 1.0) -> float:
        return 0.1 * scale * math.log(factor) + 1.0 if factor > 1 else 1.0

    factor = params["factor"]
    if params.get("mscale") and params.get("mscale_all_dim"):
        return mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
    return mscale(factor)


def rotation_angles(rotary_dim: int, max_positions: int, params: dict) -> tuple[torch.Tensor, float]:
    """[max_positions, rotary_dim / 2] angles, and the factor that scales cos and sin (LongRoPE's and YaRN's attention
    factor)."""
    positions = torch.arange(max_positions, dtype=torch.float64)
    if params["rope_type"] != "longrope":
        scale = yarn_attention_factor(params) if params["rope_type"] == "yarn" else 1.0
        return torch.outer(positions, inverse_frequencies(rotary_dim, params)), scale
    # LongRoPE: HF switches every position to the long factors once a sequence passes the pretraining length; here
    # each position takes the short factors below that length and the long ones from it (the same below it).
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or params["max_position_embeddings"] / original
    scale = params.get("attention_factor") or (
        math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0)
    short = torch.outer(positions, inverse_frequencies(rotary_dim, params, params["short_factor"]))
    long = torch.outer(positions, inverse_frequencies(rotary_dim, params, params["long_factor"]))
    return torch.where(positions[:, None] < original, short, long), scale


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the HF (rotate-half) layout, over flat [tokens, heads, head_dim]; with a partial
    rotary factor, only each head's first rotary_dim values turn."""

    def __init__(self, head_dim: int, max_positions: int, params: dict) -> None:
        super().__init__()
        self.rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        angles, scale = rotation_angles(self.rotary_dim, max_positions, params)
        self.register_buffer("cos", (angles.cos() * scale).float(), persistent=False)
        self.register_buffer("sin", (angles.sin() * scale).float(), persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple:
        """The rotation of each token, computed once per step and shared by all layers: [T, 1, rotary_dim / 2]
        cos and sin, or the whole tables and the positions for a fused kernel."""
        if kernels_for(self.cos):
            return self.cos, self.sin, positions
        return self.cos.index_select(0, positions).unsqueeze(1), self.sin.index_select(0, positions).unsqueeze(1), None

    @staticmethod
    def forward(cos_sin: tuple, q: torch.Tensor, k: torch.Tensor, norms: tuple | None = None):
        """Rotate q and k ([T, heads, head_dim]) by the per-token rotation from cos_sin() (in place where a fused
        kernel runs); `norms`: an RMSNorm for q's heads and one for k's, applied to each head first (Qwen3, Gemma 3)."""
        cos, sin, positions = cos_sin
        rotary_dim = 2 * cos.shape[-1]
        if positions is not None:
            kernels = kernels_for(q)
            if rotary_dim == q.shape[-1]:
                kernels.qk_rotary_(q, k, cos, sin, positions, norms)
                return q, k
            if norms:
                q, k = norms[0](q), norms[1](k)
            kernels.qk_rotary_(q[..., :rotary_dim], k[..., :rotary_dim], cos, sin, positions)
            return q, k
        if norms:
            q, k = norms[0](q), norms[1](k)
        return rotate(q, cos, sin, rotary_dim), rotate(k, cos, sin, rotary_dim)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    x1, x2 = x[..., :rotary_dim].float().chunk(2, dim=-1)
    turned = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return turned if rotary_dim == x.shape[-1] else torch.cat([turned, x[..., rotary_dim:]], dim=-1)
