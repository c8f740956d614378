"""Mixtral (8x7B, 8x22B): the Mistral layout (Llama attention, `sliding_window` on every layer where set) with a
mixture of experts in place of every MLP, its top-k weights renormalised. Checkpoints name the block
`block_sparse_moe` and an expert's gate/up/down projections w1/w3/w2; the model renames them as it loads."""
from torch import nn

from llmserve.models.layers.moe import SparseMoeBlock, route_expert_tensors
from llmserve.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from llmserve.plugins import hookimpl

# checkpoint name part -> ours
RENAMES = {".block_sparse_moe.": ".mlp.", ".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}


def rename(name: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        name = name.replace(old, new)
    return name


def checkpoint_name(name: str) -> str:
    """The checkpoint's name for one of ours (for errors)."""
    return rename(name, {new: old for old, new in RENAMES.items()})


class MixtralDecoderLayer(LlamaDecoderLayer):
    @staticmethod
    def build_mlp(config, layer_index: int) -> nn.Module:
        return SparseMoeBlock(config.hidden_size, config.num_local_experts, config.num_experts_per_tok,
                              config.intermediate_size, renormalize=True, act=config.hidden_act)


class MixtralModel(LlamaModel):
    decoder_layer_cls = MixtralDecoderLayer


class MixtralForCausalLM(LlamaForCausalLM):
    model_cls = MixtralModel

    def load_weights(self, weights) -> None:
        ours = ((rename(name, RENAMES), tensor) for name, tensor in weights)
        super().load_weights(route_expert_tensors(self, ours, checkpoint_name))


@hookimpl
def llmserve_models():
    return {"MixtralForCausalLM": f"{__name__}:MixtralForCausalLM"}
