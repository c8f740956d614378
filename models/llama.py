"""The Llama family (Llama 2/3/3.1, SmolLM2, ...) on the engine's flat token batch; Mistral, Qwen2/3 and Phi-3 are
this layout with other biases, windows, norms or rotary settings."""
import torch
from torch import nn

from llmserve.distributed import tp
from llmserve.models.layers import (Attention, CausalLM, MergedLinear, ParallelLMHead, RMSNorm, RotaryEmbedding,
                                    RowParallelLinear, VocabParallelEmbedding, act_and_mul, embedding_for_stage,
                                    head_for_stage, layer_sliding_window,
                                    load_checkpoint, present, qkv_slices, rope_parameters, stage_input,
                                    stage_layer_list, stage_output)
from llmserve.plugins import hookimpl


class LlamaAttention(nn.Module):
    qk_norms: tuple | None = None  # RMSNorms over each head of q and of k before rotary (Qwen3)
    attention_sinks = False  # a learned logit per head in each softmax's denominator (gpt-oss)

    @staticmethod
    def biases(config) -> tuple[bool, bool]:
        """Whether q/k/v and o_proj have biases."""
        bias = getattr(config, "attention_bias", False)
        return bias, bias

    @staticmethod
    def scale_and_softcap(config, head_dim: int) -> tuple[float, float | None]:
        """The softmax scale and the attention logit soft-cap (None: none)."""
        return head_dim**-0.5, None

    def __init__(self, config, layer_index: int) -> None:
        super().__init__()
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        q_size, kv_size = heads * self.head_dim, kv_heads * self.head_dim
        qkv_bias, o_bias = self.biases(config)
        slices, self.num_heads, self.num_kv_heads = qkv_slices(heads, kv_heads, self.head_dim)  # this rank's heads
        self.qkv_proj = MergedLinear(config.hidden_size, [q_size, kv_size, kv_size], qkv_bias, slices)
        self.o_proj = RowParallelLinear(q_size, config.hidden_size, bias=o_bias)
        self.split = [length for _, length in slices]
        scale, softcap = self.scale_and_softcap(config, self.head_dim)
        self.attn = Attention(layer_index, self.num_heads, self.num_kv_heads, self.head_dim, scale,
                              layer_sliding_window(config, layer_index), softcap, self.attention_sinks)

    def forward(self, rope, x: torch.Tensor, attn_metadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        tokens = x.shape[0]
        q, k = RotaryEmbedding.forward(rope, q.view(tokens, -1, self.head_dim), k.view(tokens, -1, self.head_dim),
                                       self.qk_norms)
        return self.o_proj(self.attn(q, k, v, attn_metadata))


class LlamaMLP(nn.Module):
    def __init__(self, config, intermediate_size: int | None = None) -> None:
        super().__init__()
        size = intermediate_size or config.intermediate_size  # a MoE model's shared expert has its own
        self.act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", "silu")  # Gemma's name
        self.gate_up_proj = MergedLinear(config.hidden_size, [size, size], bias=getattr(config, "mlp_bias", False),
                                         what="intermediate size")
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=getattr(config, "mlp_bias", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(act_and_mul(self.gate_up_proj(x), self.act))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_index: int, attention_cls: type[LlamaAttention]) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention_cls(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = self.build_mlp(config, layer_index)

    @staticmethod
    def build_mlp(config, layer_index: int) -> nn.Module:
        """The layer's feed-forward block (a MoE model's: experts, or a dense MLP on the layers its config says)."""
        return LlamaMLP(config)

    def forward(self, rope, x, residual, attn_metadata):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x, attn_metadata)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    decoder_layer_cls = LlamaDecoderLayer  # a subclass's layer (e.g. a MoE model's, with its own feed-forward block)

    def __init__(self, config, attention_cls: type[LlamaAttention]) -> None:
        super().__init__()
        self.embed_tokens = embedding_for_stage(lambda: VocabParallelEmbedding(config.vocab_size, config.hidden_size),
                                                getattr(config, "tie_word_embeddings", False))
        self.layers = stage_layer_list(config.num_hidden_layers,
                                       lambda i: self.decoder_layer_cls(config, i, attention_cls))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        attn = present(self.layers)[0].self_attn
        self.rotary = RotaryEmbedding(attn.head_dim, config.max_position_embeddings, rope_parameters(config))

    def forward(self, input_ids, positions, attn_metadata):
        x, residual = stage_input(lambda: self.embed_tokens(input_ids), input_ids, self.norm.weight.shape[0],
                                  self.norm.weight.dtype, with_residual=True)
        rope = self.rotary.cos_sin(positions)
        for layer in present(self.layers):
            x, residual = layer(rope, x, residual, attn_metadata)
        if stage_output(x, residual):
            return None
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(CausalLM):
    attention_cls = LlamaAttention  # a subclass's attention block (e.g. Qwen3's, with q/k norms)
    model_cls = LlamaModel  # a subclass's body (e.g. Gemma's, with its sandwich norms)

    def __init__(self, hf_config, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = hf_config
        self.model = self.model_cls(hf_config, self.attention_cls)
        self.lm_head = head_for_stage(lambda: ParallelLMHead(hf_config.hidden_size, hf_config.vocab_size))
        if getattr(hf_config, "tie_word_embeddings", False) and tp().last_stage:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata) -> torch.Tensor:
        return self.model(input_ids, positions, attn_metadata)

    def load_weights(self, weights) -> None:
        load_checkpoint(self, ((name, tensor) for name, tensor in weights if "rotary_emb.inv_freq" not in name))


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: the Llama layout with `sliding_window` on every layer (the shared window rule does that)."""


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3/3.5, Phi-4-mini: checkpoints ship qkv_proj and gate_up_proj already fused (our merged parameters' names),
    with a partial rotary factor, LongRoPE and a sliding window on every layer, all read from the config."""


@hookimpl
def llmserve_models():
    return {name: f"{__name__}:{name}" for name in ("LlamaForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM")}
