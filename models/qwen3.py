"""Qwen3: the Llama layout with an RMSNorm over each head of q and k before rotary."""
from llmserve.models.layers import RMSNorm
from llmserve.models.llama import LlamaAttention, LlamaForCausalLM
from llmserve.plugins import hookimpl


def layer_sliding_window(config, layer_index: int) -> int | None:
    """The layer's window as HF decides it: only with use_sliding_window, on the layers from max_window_layers on
    (or those layer_types marks "sliding_attention")."""
    if not getattr(config, "use_sliding_window", False):
        return None
    types = getattr(config, "layer_types", None)
    sliding = types[layer_index] == "sliding_attention" if types else layer_index >= config.max_window_layers
    return config.sliding_window if sliding else None


class Qwen3Attention(LlamaAttention):
    def __init__(self, config, layer_index: int) -> None:
        super().__init__(config, layer_index)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norms = (self.q_norm, self.k_norm)
        self.attn.sliding_window = layer_sliding_window(config, layer_index)


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_cls = Qwen3Attention


@hookimpl
def llmserve_models():
    return {"Qwen3ForCausalLM": "llmserve.models.qwen3:Qwen3ForCausalLM"}
