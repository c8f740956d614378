"""Qwen2 and Qwen3 on random weights against HF transformers, and the benchmark configs (no weights) building our
models."""
from pathlib import Path

import pytest
import torch
from conftest import assert_greedy_matches_hf

from llmserve import LLM, SamplingParams

from llmserve.loader import load_hf_config
from llmserve.models.qwen import Qwen3ForCausalLM
from llmserve.plugins.select import model_class

BENCHMARK_MODELS = Path(__file__).parent.parent / "benchmarks" / "models"


def qwen3_config(**overrides):
    from transformers import Qwen3Config

    # head_dim 48, not hidden_size / heads = 32; GQA 4:2; tied embeddings as in Qwen3-0.6B
    args = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=48, max_position_embeddings=4096, rope_theta=1000000.0,
                tie_word_embeddings=True)
    return Qwen3Config(**(args | overrides))


@pytest.mark.parametrize("overrides", [
    {},
    # biased projections, and the last two layers see only 8 tokens back (the 90-token prompt crosses it)
    {"attention_bias": True, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
])
def test_qwen3_safetensors_matches_hf(tmp_path, overrides):
    assert_greedy_matches_hf(qwen3_config(**overrides), tmp_path)


def qwen2_config(**overrides):
    from transformers import Qwen2Config

    args = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1000000.0, tie_word_embeddings=False,
                architectures=["Qwen2ForCausalLM"])
    return Qwen2Config(**(args | overrides))


@pytest.mark.parametrize("overrides", [
    {},
    # tied head (Qwen2.5-0.5B); the last two layers see 8 tokens back, the first is global (max_window_layers)
    {"tie_word_embeddings": True, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
])
def test_qwen2_safetensors_matches_hf(tmp_path, overrides):
    assert_greedy_matches_hf(qwen2_config(**overrides), tmp_path)


def test_qwen2_has_qkv_biases_and_no_o_proj_bias():
    from llmserve.models.qwen import Qwen2ForCausalLM

    with torch.device("meta"):
        attn = Qwen2ForCausalLM(qwen2_config(), torch.float32).model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None


def test_attention_spec_has_a_window_only_when_a_layer_uses_one():
    unused = qwen3_config()
    unused.sliding_window = 4096  # as older configs keep it, with use_sliding_window off
    used = qwen3_config(use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with torch.device("meta"):
        assert Qwen3ForCausalLM(unused, torch.float32).attention_spec(16).sliding_window is None
        assert Qwen3ForCausalLM(used, torch.float32).attention_spec(16).sliding_window == 8


@pytest.mark.parametrize("name, architecture, parameters, heads", [
    ("Llama-3.1-8B", "LlamaForCausalLM", 8_030_261_248, (32, 8, 128)),
    ("Qwen3-0.6B", "Qwen3ForCausalLM", 596_049_920, (16, 8, 128)),
    ("SmolLM2-135M", "LlamaForCausalLM", 134_515_008, (9, 3, 64)),
])
def test_benchmark_configs_build(name, architecture, parameters, heads):
    from transformers import AutoModelForCausalLM

    hf_config = load_hf_config(str(BENCHMARK_MODELS / name))
    cls = model_class(hf_config)
    with torch.device("meta"):  # shapes only, no memory
        ours = cls(hf_config, torch.bfloat16)
        reference = AutoModelForCausalLM.from_config(hf_config)
    assert cls.__name__ == architecture
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters()) == parameters
    spec = ours.attention_spec(16)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.sliding_window) == (*heads, None)


def test_benchmark_config_runs_without_tokenizer():
    folder = str(BENCHMARK_MODELS / "SmolLM2-135M")
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        LLM(model=folder, load_format="dummy")
    llm = LLM(model=folder, load_format="dummy", dtype="float32", skip_tokenizer_init=True, max_model_len=256,
              kv_cache_memory_bytes=64 << 20)
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=5, ignore_eos=True, logprobs=1), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].text == ""
    assert out.outputs[0].logprobs[0][out.outputs[0].token_ids[0]].decoded_token is None
    for prompt, params in (("text", SamplingParams()), ([1, 2], SamplingParams(stop="x"))):
        with pytest.raises(ValueError, match="skip_tokenizer_init"):
            llm.generate(prompt, params, use_tqdm=False)
