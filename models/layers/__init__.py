"""Layers shared by the models: norms, rotary embedding, linear layers, attention, activations, weight loading."""
from llmserve.models.layers.activation import act_and_mul, activation, silu_and_mul
from llmserve.models.layers.attention import Attention, attention_spec, layer_sliding_window
from llmserve.models.layers.causal_lm import CausalLM
from llmserve.models.layers.linear import (ColumnParallelLinear, Linear, MergedLinear, ParallelLMHead,
                                           RowParallelLinear, VocabParallelEmbedding, qkv_slices)
from llmserve.models.layers.norm import RMSNorm
from llmserve.models.layers.pipeline import (MissingLayer, embedding_for_stage, head_for_stage, present, stage_input,
                                             stage_layer_list, stage_output)
from llmserve.models.layers.rotary import RotaryEmbedding, rope_parameters
from llmserve.models.layers.weights import QKV_GATE_UP, load_checkpoint

__all__ = ["Attention", "CausalLM", "ColumnParallelLinear", "Linear", "MergedLinear", "MissingLayer", "ParallelLMHead",
           "QKV_GATE_UP", "RMSNorm", "RotaryEmbedding", "RowParallelLinear", "VocabParallelEmbedding", "act_and_mul",
           "activation", "attention_spec", "embedding_for_stage", "head_for_stage", "layer_sliding_window",
           "load_checkpoint", "present", "qkv_slices",
           "rope_parameters", "silu_and_mul", "stage_input", "stage_layer_list", "stage_output"]
