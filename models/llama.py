"""The Llama family (Llama 2/3/3.1, SmolLM2, ...) on the engine's flat token batch."""
import torch
from torch import nn

from llmserve.interfaces import AttentionSpec
from llmserve.models.layers import (Attention, Linear, MergedLinear, RMSNorm, RotaryEmbedding, rope_parameters,
                                    silu_and_mul)
from llmserve.plugins import hookimpl

# checkpoint projection name -> (our merged parameter, shard index)
STACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class LlamaAttention(nn.Module):
    qk_norms: tuple | None = None  # RMSNorms over each head of q and of k before rotary (Qwen3)

    def __init__(self, config, layer_index: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = MergedLinear(config.hidden_size, [q_size, kv_size, kv_size], bias=bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=bias)
        self.split = [q_size, kv_size, kv_size]
        self.attn = Attention(layer_index, self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5,
                              getattr(config, "sliding_window", None))

    def forward(self, rope, x: torch.Tensor, attn_metadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        tokens = x.shape[0]
        q, k = RotaryEmbedding.forward(rope, q.view(tokens, -1, self.head_dim), k.view(tokens, -1, self.head_dim),
                                       self.qk_norms)
        return self.o_proj(self.attn(q, k, v, attn_metadata))


class LlamaMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, [size, size], bias=getattr(config, "mlp_bias", False))
        self.down_proj = Linear(size, config.hidden_size, bias=getattr(config, "mlp_bias", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_index: int, attention_cls: type[LlamaAttention]) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention_cls(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, rope, x, residual, attn_metadata):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x, attn_metadata)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config, attention_cls: type[LlamaAttention]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, attention_cls)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        attn = self.layers[0].self_attn
        self.rotary = RotaryEmbedding(attn.head_dim, config.max_position_embeddings, rope_parameters(config))

    def forward(self, input_ids, positions, attn_metadata):
        x, residual = self.embed_tokens(input_ids), None
        rope = self.rotary.cos_sin(positions)
        for layer in self.layers:
            x, residual = layer(rope, x, residual, attn_metadata)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    attention_cls = LlamaAttention  # a subclass's attention block (e.g. Qwen3's, with q/k norms)

    def __init__(self, hf_config, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = hf_config
        self.model = LlamaModel(hf_config, self.attention_cls)
        self.lm_head = Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False)
        if getattr(hf_config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def attention_spec(self, block_size: int) -> AttentionSpec:
        attn = self.model.layers[0].self_attn
        windows = [layer.self_attn.attn.sliding_window for layer in self.model.layers]
        return AttentionSpec(attn.num_heads, attn.num_kv_heads, attn.head_dim, self.lm_head.weight.dtype,
                             block_size, max((w for w in windows if w), default=None))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata) -> torch.Tensor:
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights) -> None:
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and getattr(self.config, "tie_word_embeddings", False):
                continue
            layer_part, _, leaf = name.rpartition(".")
            module_path, _, proj = layer_part.rpartition(".")
            if proj in STACKED:
                merged, shard = STACKED[proj]
                module = self.get_submodule(f"{module_path}.{merged}")
                module.load_shard(shard, tensor.to(getattr(module, leaf).dtype), leaf)
                loaded.add(f"{module_path}.{merged}.{leaf}")
                continue
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no parameter in {type(self).__name__}")
            if params[name].shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(params[name].shape)}")
            with torch.no_grad():
                params[name].copy_(tensor)
            loaded.add(name)
        missing = sorted(set(params) - loaded - ({"lm_head.weight"} if self.lm_head.weight is self.model.embed_tokens.weight else set()))
        if missing:
            raise ValueError(f"checkpoint has no weights for {len(missing)} parameters, e.g. {missing[:3]}")


@hookimpl
def llmserve_models():
    return {"LlamaForCausalLM": "llmserve.models.llama:LlamaForCausalLM"}
