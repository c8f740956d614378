"""Architectures on random weights for real configs, against HF transformers built from the same state dict."""
import pytest
import torch
from conftest import assert_greedy_matches_hf, greedy, save_random_model

from llmserve import LLM

PROMPTS = [[5, 17, 300, 4000, 12], list(range(200, 290)), [42] * 7]


def llama_config(**overrides):
    from transformers import LlamaConfig

    args = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=8,
                num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 256}, rope_theta=500000.0)
    return LlamaConfig(**(args | overrides))


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 8, "rope_scaling": None, "head_dim": 32}])
def test_llama_safetensors_matches_hf(tmp_path, overrides):
    assert_greedy_matches_hf(llama_config(**overrides), tmp_path)


def test_dummy_weights_load_without_checkpoint(tmp_path):
    save_random_model(llama_config(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    out = LLM(model=str(tmp_path), load_format="dummy", dtype="float32").generate(PROMPTS[:1], greedy(4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_unsupported_architecture(tmp_path):
    from transformers import BloomConfig

    BloomConfig(architectures=["BloomForCausalLM"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="BloomForCausalLM.*not supported.*LlamaForCausalLM"):
        LLM(model=str(tmp_path), load_format="dummy", skip_tokenizer_init=True)


def test_mistral_window_on_every_layer_matches_hf(tmp_path):
    from transformers import MistralConfig

    config = MistralConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=48, max_position_embeddings=4096,
                           sliding_window=8, architectures=["MistralForCausalLM"])
    assert_greedy_matches_hf(config, tmp_path)


def phi3_config(**overrides):
    from transformers import Phi3Config

    args = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                architectures=["Phi3ForCausalLM"])
    return Phi3Config(**(args | overrides))


def longrope(head_dim: int, rotary_factor: float) -> dict:
    half = int(head_dim * rotary_factor) // 2
    return {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": rotary_factor,
            "original_max_position_embeddings": 256, "short_factor": [1.0 + i / half for i in range(half)],
            "long_factor": [1.0 + 4 * i / half for i in range(half)]}


@pytest.mark.parametrize("overrides", [
    {},  # head size 32, full rotary
    {"sliding_window": 8, "num_key_value_heads": 4},  # Phi-3-mini's window on every layer, MHA
    # Phi-4-mini's shape: a partial rotary factor and LongRoPE (short factors here: prompts stay under 256 tokens)
    {"rope_parameters": longrope(32, 0.75), "tie_word_embeddings": True},
])
def test_phi3_fused_checkpoint_matches_hf(tmp_path, overrides):
    assert_greedy_matches_hf(phi3_config(**overrides), tmp_path)


def test_longrope_switches_to_long_factors_at_the_pretraining_length():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from llmserve.models.layers import RotaryEmbedding, rope_parameters

    config = phi3_config(rope_parameters=longrope(32, 0.75), max_position_embeddings=1024)
    rotary = RotaryEmbedding(32, 1024, rope_parameters(config))
    for seq_len, rows in ((256, slice(0, 256)), (257, slice(256, 1024))):
        inv_freq, scale = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=seq_len)
        angles = torch.arange(1024, dtype=torch.float64)[:, None] * inv_freq.double()
        torch.testing.assert_close(rotary.cos[rows], (angles.cos() * scale).float()[rows], atol=1e-4, rtol=0)
        torch.testing.assert_close(rotary.sin[rows], (angles.sin() * scale).float()[rows], atol=1e-4, rtol=0)
