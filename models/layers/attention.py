import torch
from torch import nn


class Attention(nn.Module):
    """One layer's attention over the paged KV cache; the engine gives it a backend and its cache."""

    def __init__(self, layer_index: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float, sliding_window: int | None = None) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.backend = None
        self.kv_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_metadata) -> torch.Tensor:
        """q [T, heads*head_dim], k/v [T, kv_heads*head_dim] -> [T, heads*head_dim]."""
        tokens = q.shape[0]
        out = self.backend.forward(self, q.view(tokens, self.num_heads, self.head_dim),
                                   k.view(tokens, self.num_kv_heads, self.head_dim),
                                   v.view(tokens, self.num_kv_heads, self.head_dim), self.kv_cache, attn_metadata)
        return out.reshape(tokens, self.num_heads * self.head_dim)
