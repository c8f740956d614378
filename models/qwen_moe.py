"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B: routed experts plus a shared expert gated per token) and Qwen3-MoE
(Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen2's and Qwen3's attention, with a mixture of experts in place of the MLP on
every `decoder_sparse_step`-th layer except the `mlp_only_layers`, which keep a dense MLP."""
import copy

import torch
from torch import nn

from llmserve.models.layers import act_and_mul
from llmserve.models.layers.moe import SparseMoeBlock, route_expert_tensors
from llmserve.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel
from llmserve.models.qwen import Qwen2Attention, Qwen3Attention
from llmserve.plugins import hookimpl


def sparse_layer(config, layer_index: int) -> bool:
    """Whether the layer has experts, as HF decides it."""
    return (layer_index not in (getattr(config, "mlp_only_layers", None) or []) and config.num_experts > 0
            and (layer_index + 1) % getattr(config, "decoder_sparse_step", 1) == 0)


def experts_args(config) -> tuple:
    """SparseMoeBlock's arguments from a Qwen-MoE config (top-k weights renormalised as `norm_topk_prob` says)."""
    return (config.hidden_size, config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size,
            getattr(config, "norm_topk_prob", False), config.hidden_act)


class Qwen2MoeBlock(SparseMoeBlock):
    """The routed experts plus a shared expert every token goes through, scaled by sigmoid(shared_expert_gate)."""

    def __init__(self, config) -> None:
        super().__init__(*experts_args(config))
        self.shared_expert = LlamaMLP(config, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)  # replicated, never quantized

    def shared_output(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.shared_expert
        # its down projection without the all-reduce: the block reduces it with the experts' sum, once
        partial = mlp.down_proj.project(act_and_mul(mlp.gate_up_proj(x), mlp.act), None)
        return torch.sigmoid(self.shared_expert_gate(x)) * partial


class Qwen2MoeAttention(Qwen2Attention):
    @staticmethod
    def biases(config) -> tuple[bool, bool]:
        return getattr(config, "qkv_bias", True), False


class Qwen2MoeDecoderLayer(LlamaDecoderLayer):
    @staticmethod
    def build_mlp(config, layer_index: int) -> nn.Module:
        return Qwen2MoeBlock(config) if sparse_layer(config, layer_index) else LlamaMLP(config)


class Qwen3MoeDecoderLayer(LlamaDecoderLayer):
    @staticmethod
    def build_mlp(config, layer_index: int) -> nn.Module:
        return SparseMoeBlock(*experts_args(config)) if sparse_layer(config, layer_index) else LlamaMLP(config)


class Qwen2MoeModel(LlamaModel):
    decoder_layer_cls = Qwen2MoeDecoderLayer


class Qwen3MoeModel(LlamaModel):
    decoder_layer_cls = Qwen3MoeDecoderLayer


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    attention_cls = Qwen2MoeAttention
    model_cls = Qwen2MoeModel

    def load_weights(self, weights) -> None:
        super().load_weights(route_expert_tensors(self, weights))


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    attention_cls = Qwen3Attention
    model_cls = Qwen3MoeModel

    def __init__(self, hf_config, dtype: torch.dtype) -> None:
        if getattr(hf_config, "use_sliding_window", False) and getattr(hf_config, "sliding_window", None):
            # HF's Qwen3-MoE windows every layer (no max_window_layers rule): say so in the shared rule's terms
            hf_config = copy.copy(hf_config)
            hf_config.layer_types = ["sliding_attention"] * hf_config.num_hidden_layers
        super().__init__(hf_config, dtype)

    def load_weights(self, weights) -> None:
        super().load_weights(route_expert_tensors(self, weights))


@hookimpl
def llmserve_models():
    return {name: f"{__name__}:{name}" for name in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")}
