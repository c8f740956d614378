"""Gemma 2 and Gemma 3 (text): the Llama projections with (1 + weight) RMSNorms around both attention and MLP, scaled
embeddings, a gated GeLU-tanh MLP, interleaved sliding-window and global layers, and tanh soft-capping; Gemma 3 adds
per-head q/k norms and a rotary embedding per layer type."""
import torch
from torch import nn

from llmserve.models.layers import (MissingLayer, RMSNorm, RotaryEmbedding, VocabParallelEmbedding, embedding_for_stage,
                                    present,
                                    rope_parameters, stage_input, stage_layer_list, stage_output)
from llmserve.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from llmserve.plugins import hookimpl


def gemma_norm(config, size: int | None = None) -> RMSNorm:
    return RMSNorm(size or config.hidden_size, config.rms_norm_eps, offset=1.0)


class Gemma2Attention(LlamaAttention):
    @staticmethod
    def scale_and_softcap(config, head_dim: int) -> tuple[float, float | None]:
        return config.query_pre_attn_scalar**-0.5, config.attn_logit_softcapping


class Gemma3Attention(LlamaAttention):
    @staticmethod
    def scale_and_softcap(config, head_dim: int) -> tuple[float, float | None]:
        return config.query_pre_attn_scalar**-0.5, None  # HF's Gemma 3 reads attn_logit_softcapping, never applies it

    def __init__(self, config, layer_index: int) -> None:
        super().__init__(config, layer_index)
        self.q_norm = gemma_norm(config, self.head_dim)
        self.k_norm = gemma_norm(config, self.head_dim)
        self.qk_norms = (self.q_norm, self.k_norm)


class GemmaDecoderLayer(nn.Module):
    """Attention and MLP each between a norm of its input and a norm of its output, before the residual add."""

    def __init__(self, config, layer_index: int, attention_cls: type[LlamaAttention]) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = gemma_norm(config), gemma_norm(config)
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = gemma_norm(config), gemma_norm(config)
        self.self_attn = attention_cls(config, layer_index)
        self.mlp = LlamaMLP(config)

    def forward(self, rope, x: torch.Tensor, residual: torch.Tensor | None, attn_metadata):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(rope, x, attn_metadata))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class GemmaModel(nn.Module):
    def __init__(self, config, attention_cls: type[LlamaAttention]) -> None:
        super().__init__()
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("Gemma with use_bidirectional_attention (an embedding model) is not supported")
        self.embed_tokens = embedding_for_stage(lambda: VocabParallelEmbedding(config.vocab_size, config.hidden_size),
                                                getattr(config, "tie_word_embeddings", False))
        # a buffer in the model's dtype, as in HF: sqrt(hidden_size) is rounded to it (sqrt(640) -> 25.25 in bf16)
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size**0.5), persistent=False)
        self.layers = stage_layer_list(config.num_hidden_layers, lambda i: GemmaDecoderLayer(config, i, attention_cls))
        self.norm = gemma_norm(config)
        # one rotary table per distinct rope setting: Gemma 3's local and global layers have their own, Gemma 2's share
        settings = [rope_parameters(config, layer_type) for layer_type in config.layer_types]
        distinct = [s for i, s in enumerate(settings) if s not in settings[:i]]
        head_dim = present(self.layers)[0].self_attn.head_dim
        self.rotaries = nn.ModuleList(RotaryEmbedding(head_dim, config.max_position_embeddings, s) for s in distinct)
        self.layer_rotary = [distinct.index(s) for s in settings]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata) -> torch.Tensor:
        dtype = self.norm.weight.dtype
        x, residual = stage_input(lambda: self.embed_tokens(input_ids) * self.embed_scale.to(dtype), input_ids,
                                  self.norm.weight.shape[0], dtype, with_residual=True)
        ropes = [rotary.cos_sin(positions) for rotary in self.rotaries]
        for layer, rotary in zip(self.layers, self.layer_rotary):
            if not isinstance(layer, MissingLayer):
                x, residual = layer(ropes[rotary], x, residual, attn_metadata)
        if stage_output(x, residual):
            return None
        x, _ = self.norm(x, residual)
        return x


class Gemma2ForCausalLM(LlamaForCausalLM):
    attention_cls = Gemma2Attention
    model_cls = GemmaModel

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        return cap * torch.tanh(logits / cap) if cap else logits


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    attention_cls = Gemma3Attention


@hookimpl
def llmserve_models():
    return {name: f"{__name__}:{name}" for name in ("Gemma2ForCausalLM", "Gemma3ForCausalLM")}
