"""Qwen2/Qwen2.5 (q/k/v biases, no o_proj bias) and Qwen3 (an RMSNorm over each head of q and k before rotary): the
Llama layout, with the sliding window only on the layers the config names."""
from llmserve.models.layers import RMSNorm
from llmserve.models.llama import LlamaAttention, LlamaForCausalLM
from llmserve.plugins import hookimpl


class Qwen2Attention(LlamaAttention):
    @staticmethod
    def biases(config) -> tuple[bool, bool]:
        return True, False


class Qwen3Attention(LlamaAttention):
    def __init__(self, config, layer_index: int) -> None:
        super().__init__(config, layer_index)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norms = (self.q_norm, self.k_norm)


class Qwen2ForCausalLM(LlamaForCausalLM):
    attention_cls = Qwen2Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_cls = Qwen3Attention


@hookimpl
def llmserve_models():
    return {name: f"{__name__}:{name}" for name in ("Qwen2ForCausalLM", "Qwen3ForCausalLM")}
