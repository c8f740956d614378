"""gpt-oss (gpt-oss-20b, gpt-oss-120b): Llama's layout with q/k/v/o biases, attention sinks (a learned logit per head
in each softmax's denominator), a 128-token window on every other layer (`layer_types`), YaRN rotary, and a mixture
of experts on every layer: a biased router whose top-k logits are softmaxed, experts with biases and a clamped
SwiGLU, (up + 1) * gate * sigmoid(1.702 gate) with gate <= 7 and |up| <= 7.

Checkpoints hold each layer's experts stacked, gate and up interleaved column by column: `experts.gate_up_proj`
[E, H, 2I] (gate at even columns) and `experts.down_proj` [E, I, H], with biases; they are turned into the shared MoE
layer's [E, 2I, H] (gate rows, then up) and [E, H, I] as they load. The released checkpoints store those experts in
MXFP4, which quantization/mxfp4.py dequantizes as they load."""
from collections.abc import Iterator

import torch

from llmserve.models.layers.moe import GatedActivation, SparseMoeBlock
from llmserve.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from llmserve.plugins import hookimpl


class GptOssAttention(LlamaAttention):
    attention_sinks = True


class GptOssDecoderLayer(LlamaDecoderLayer):
    @staticmethod
    def build_mlp(config, layer_index: int) -> SparseMoeBlock:
        # HF softmaxes the top-k logits: the same weights as the softmax over all, renormalised over the k
        activation = GatedActivation(config.swiglu_alpha, config.swiglu_limit, 1.0)
        return SparseMoeBlock(config.hidden_size, config.num_local_experts, config.num_experts_per_tok,
                              config.intermediate_size, renormalize=True, act=activation, bias=True)


class GptOssModel(LlamaModel):
    decoder_layer_cls = GptOssDecoderLayer


def gate_rows_then_up(interleaved: torch.Tensor, dim: int) -> torch.Tensor:
    """gate, up, gate, up, ... along `dim` -> every gate, then every up."""
    pairs = interleaved.unflatten(dim, (-1, 2))
    return torch.cat([pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)], dim=dim)


class GptOssForCausalLM(LlamaForCausalLM):
    attention_cls = GptOssAttention
    model_cls = GptOssModel

    @staticmethod
    def renamed(weights) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's names and layouts as the shared layers hold them."""
        for name, tensor in weights:
            if name.endswith(".self_attn.sinks"):
                yield name.replace(".self_attn.sinks", ".self_attn.attn.sinks"), tensor
            elif ".mlp.router." in name:
                yield name.replace(".mlp.router.", ".mlp.gate."), tensor
            elif name.endswith(".experts.gate_up_proj"):  # [E, H, 2I] interleaved -> [E, 2I, H], gate rows first
                yield name, gate_rows_then_up(tensor.transpose(1, 2), 1)
            elif name.endswith(".experts.gate_up_proj_bias"):
                yield name, gate_rows_then_up(tensor, 1)
            elif name.endswith(".experts.down_proj"):  # [E, I, H] -> [E, H, I]
                yield name, tensor.transpose(1, 2)
            else:
                yield name, tensor

    def load_weights(self, weights) -> None:
        super().load_weights(self.renamed(weights))


@hookimpl
def llmserve_models():
    return {"GptOssForCausalLM": f"{__name__}:GptOssForCausalLM"}
