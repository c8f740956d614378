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
    from transformers import GPT2Config

    GPT2Config(architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported.*LlamaForCausalLM"):
        LLM(model=str(tmp_path), load_format="dummy", skip_tokenizer_init=True)
