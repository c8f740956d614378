"""OPT (facebook/opt-*): learned positions offset by 2, LayerNorm before (125m) or after (350m) each block, biases,
and a down-projected embedding (`word_embed_proj_dim`) on some sizes."""
from collections.abc import Callable

import torch
from torch import nn

from llmserve.distributed import tp
from llmserve.models.layers import (Attention, CausalLM, ColumnParallelLinear, Linear, MergedLinear, ParallelLMHead,
                                    RowParallelLinear, VocabParallelEmbedding, activation, embedding_for_stage,
                                    head_for_stage, load_checkpoint, present,
                                    qkv_slices, stage_input, stage_layer_list, stage_output)
from llmserve.plugins import hookimpl

POSITION_OFFSET = 2  # OPT's position embedding row for position p is p + 2 (a fairseq legacy)


class OPTAttention(nn.Module):
    def __init__(self, config, layer_index: int) -> None:
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim = hidden // heads
        slices, local_heads, _ = qkv_slices(heads, heads, head_dim)
        self.qkv_proj = MergedLinear(hidden, [hidden] * 3, config.enable_bias, slices)
        self.out_proj = RowParallelLinear(hidden, hidden, bias=config.enable_bias)
        self.attn = Attention(layer_index, local_heads, local_heads, head_dim, head_dim**-0.5)

    def forward(self, x: torch.Tensor, attn_metadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        return self.out_proj(self.attn(q, k, v, attn_metadata))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config, layer_index: int) -> None:
        super().__init__()
        hidden, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.norm_before = config.do_layer_norm_before
        self.self_attn = OPTAttention(config, layer_index)
        self.self_attn_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.fc1 = ColumnParallelLinear(hidden, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = RowParallelLinear(config.ffn_dim, hidden, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.act = activation(config.activation_function)

    def residual(self, norm: nn.LayerNorm, sublayer: Callable, x: torch.Tensor) -> torch.Tensor:
        """x + sublayer, normalized before the sublayer (pre-norm) or after the sum (post-norm)."""
        return x + sublayer(norm(x)) if self.norm_before else norm(x + sublayer(x))

    def forward(self, x: torch.Tensor, attn_metadata) -> torch.Tensor:
        x = self.residual(self.self_attn_layer_norm, lambda h: self.self_attn(h, attn_metadata), x)
        return self.residual(self.final_layer_norm, lambda h: self.fc2(self.act(self.fc1(h))), x)


class OPTDecoder(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        hidden, embed_dim = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = embedding_for_stage(lambda: VocabParallelEmbedding(config.vocab_size, embed_dim),
                                                config.tie_word_embeddings)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, hidden)
        self.project_in = Linear(embed_dim, hidden, bias=False) if embed_dim != hidden else None
        self.project_out = Linear(hidden, embed_dim, bias=False) if embed_dim != hidden else None
        has_final_norm = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
        self.final_layer_norm = (nn.LayerNorm(hidden, elementwise_affine=config.layer_norm_elementwise_affine)
                                 if has_final_norm else None)
        self.layers = stage_layer_list(config.num_hidden_layers, lambda i: OPTDecoderLayer(config, i))

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        return x + self.embed_positions(positions + POSITION_OFFSET)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata) -> torch.Tensor:
        x, _ = stage_input(lambda: self.embed(input_ids, positions), input_ids, self.embed_positions.weight.shape[1],
                           self.embed_positions.weight.dtype)
        for layer in present(self.layers):
            x = layer(x, attn_metadata)
        if stage_output(x):
            return None
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x


class OPTForCausalLM(CausalLM):
    def __init__(self, hf_config, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = hf_config
        self.decoder = OPTDecoder(hf_config)  # HF's `model.decoder`: load_weights drops the `model.`
        self.lm_head = head_for_stage(lambda: ParallelLMHead(hf_config.word_embed_proj_dim, hf_config.vocab_size))
        if hf_config.tie_word_embeddings and tp().last_stage:
            self.lm_head.weight = self.decoder.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata) -> torch.Tensor:
        return self.decoder(input_ids, positions, attn_metadata)

    def load_weights(self, weights) -> None:
        # HF checkpoints name `model.decoder.*`, the original OPT ones `decoder.*`
        load_checkpoint(self, ((name.removeprefix("model."), tensor) for name, tensor in weights))


@hookimpl
def llmserve_models():
    return {"OPTForCausalLM": f"{__name__}:OPTForCausalLM"}
