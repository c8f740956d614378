"""GPT-2 (and its configs: DistilGPT2, the Megatron/Stanford variants with scale_attn_by_inverse_layer_idx): learned
positions, pre-norm LayerNorm blocks, fused q/k/v, tied head; checkpoints keep Conv1D weights as [in, out]."""
import torch
from torch import nn

from llmserve.distributed import tp
from llmserve.models.layers import (Attention, CausalLM, ColumnParallelLinear, MergedLinear, ParallelLMHead,
                                    RowParallelLinear, VocabParallelEmbedding, activation, embedding_for_stage,
                                    head_for_stage, load_checkpoint, present,
                                    qkv_slices, stage_input, stage_layer_list, stage_output)
from llmserve.plugins import hookimpl

CONV1D = ("c_attn", "c_proj", "c_fc")  # HF Conv1D modules: their weights are nn.Linear's transposed
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers that old checkpoints carry


class GPT2Attention(nn.Module):
    def __init__(self, config, layer_index: int) -> None:
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim = hidden // heads
        scale = head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_index + 1
        slices, local_heads, _ = qkv_slices(heads, heads, head_dim)
        self.c_attn = MergedLinear(hidden, [hidden] * 3, True, slices)  # q, k, v: stacked in the checkpoint too
        self.c_proj = RowParallelLinear(hidden, hidden, bias=True)
        self.attention = Attention(layer_index, local_heads, local_heads, head_dim, scale)

    def forward(self, x: torch.Tensor, attn_metadata) -> torch.Tensor:
        q, k, v = self.c_attn(x).chunk(3, dim=-1)
        return self.c_proj(self.attention(q, k, v, attn_metadata))


class GPT2MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        inner = config.n_inner or 4 * config.hidden_size
        self.c_fc = ColumnParallelLinear(config.hidden_size, inner, bias=True)
        self.c_proj = RowParallelLinear(inner, config.hidden_size, bias=True)
        self.act = activation(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config, layer_index: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_index)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x: torch.Tensor, attn_metadata) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_metadata)
        return x + self.mlp(self.ln_2(x))


class GPT2LMHeadModel(CausalLM):
    """HF's `transformer.*` modules held directly (load_weights drops the prefix), and `lm_head`."""

    def __init__(self, hf_config, dtype: torch.dtype) -> None:
        super().__init__()
        if hf_config.add_cross_attention:
            raise ValueError("GPT2LMHeadModel: add_cross_attention is not supported (no encoder to attend to)")
        self.config = hf_config
        self.wte = embedding_for_stage(lambda: VocabParallelEmbedding(hf_config.vocab_size, hf_config.hidden_size),
                                       hf_config.tie_word_embeddings)
        self.wpe = nn.Embedding(hf_config.max_position_embeddings, hf_config.hidden_size)
        self.h = stage_layer_list(hf_config.num_hidden_layers, lambda i: GPT2Block(hf_config, i))
        self.ln_f = nn.LayerNorm(hf_config.hidden_size, eps=hf_config.layer_norm_epsilon)
        self.lm_head = head_for_stage(lambda: ParallelLMHead(hf_config.hidden_size, hf_config.vocab_size))
        if hf_config.tie_word_embeddings and tp().last_stage:
            self.lm_head.weight = self.wte.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata) -> torch.Tensor:
        x, _ = stage_input(lambda: self.wte(input_ids) + self.wpe(positions), input_ids, self.wpe.weight.shape[1],
                           self.wpe.weight.dtype)
        for block in present(self.h):
            x = block(x, attn_metadata)
        return None if stage_output(x) else self.ln_f(x)

    def load_weights(self, weights) -> None:
        def renamed():
            for name, tensor in weights:
                name = name.removeprefix("transformer.")  # hub checkpoints of gpt2 itself have no prefix
                if name.endswith(MASK_BUFFERS):
                    continue
                if name.endswith(".weight") and name.split(".")[-2] in CONV1D:
                    tensor = tensor.t()
                yield name, tensor

        load_checkpoint(self, renamed(), stacked={})


@hookimpl
def llmserve_models():
    return {"GPT2LMHeadModel": f"{__name__}:GPT2LMHeadModel"}
