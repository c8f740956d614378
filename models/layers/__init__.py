"""Layers shared by the models: norms, rotary embedding, linear layers, attention, activation."""
from llmserve.models.layers.activation import silu_and_mul
from llmserve.models.layers.attention import Attention
from llmserve.models.layers.linear import Linear, MergedLinear
from llmserve.models.layers.norm import RMSNorm
from llmserve.models.layers.rotary import RotaryEmbedding, rope_parameters

__all__ = ["Attention", "Linear", "MergedLinear", "RMSNorm", "RotaryEmbedding", "rope_parameters", "silu_and_mul"]
