import torch
from torch import nn

from llmserve.interfaces import AttentionSpec
from llmserve.models.layers.attention import attention_spec


class CausalLM(nn.Module):
    """What every decoder-only model shares: logits from `self.lm_head`, and the attention spec gathered from its
    attention layers. A model adds its body, forward() and load_weights()."""

    lm_head: nn.Module

    def attention_spec(self, block_size: int) -> AttentionSpec:
        return attention_spec(self, block_size)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
