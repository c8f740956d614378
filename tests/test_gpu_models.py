"""Every architecture on a CUDA GPU in bfloat16 (skipped without one): TRITON_ATTN and FLASHINFER with CUDA graphs give
TORCH_SDPA's greedy tokens on the same random weights, up to bf16 near ties, or refuse the model with the reason."""
import gc

import pytest
import torch
from conftest import assert_same_greedy_up_to_near_tie
from test_gpu import PROMPTS, save_random

from llmserve import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
WINDOW = 64  # shorter than the longer prompts


def configs() -> dict:
    """A small config per architecture with its features on: windows, soft-caps, partial rotary, post-norm OPT."""
    import transformers as tf

    common = dict(vocab_size=5000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                "original_max_position_embeddings": 256, "short_factor": [1.0 + i / 24 for i in range(24)],
                "long_factor": [1.0 + 4 * i / 24 for i in range(24)]}
    return {
        "LlamaForCausalLM": tf.LlamaConfig(**common),
        "Qwen2ForCausalLM": tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW,
                                           max_window_layers=2),
        "Qwen3ForCausalLM": tf.Qwen3Config(**common, head_dim=128, tie_word_embeddings=True),
        "MistralForCausalLM": tf.MistralConfig(**common, sliding_window=WINDOW),
        "Phi3ForCausalLM": tf.Phi3Config(**(common | dict(num_attention_heads=4, num_key_value_heads=4)),
                                         rope_parameters=longrope, sliding_window=WINDOW, pad_token_id=0),
        "Gemma2ForCausalLM": tf.Gemma2Config(**common, head_dim=128, sliding_window=WINDOW,
                                             query_pre_attn_scalar=144, attn_logit_softcapping=50.0,
                                             final_logit_softcapping=30.0),
        "Gemma3ForCausalLM": tf.Gemma3TextConfig(**common, head_dim=256, sliding_window=WINDOW,
                                                 rope_parameters={
                                                     "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                        "rope_theta": 1e6},
                                                     "sliding_attention": {"rope_type": "default",
                                                                           "rope_theta": 1e4}},
                                                 layer_types=["sliding_attention"] * 3 + ["full_attention"]),
        "OPTForCausalLM": tf.OPTConfig(vocab_size=5000, hidden_size=256, ffn_dim=512, num_hidden_layers=4,
                                       num_attention_heads=4, max_position_embeddings=2048,
                                       do_layer_norm_before=False, word_embed_proj_dim=128),
        "GPT2LMHeadModel": tf.GPT2Config(vocab_size=5000, n_embd=256, n_layer=4, n_head=4, n_positions=2048),
    }


def run(folder, backend: str, **engine_args):
    llm = LLM(model=str(folder), dtype="bfloat16", skip_tokenizer_init=True, max_num_batched_tokens=128,
              max_num_seqs=8, attention_backend=backend, **engine_args)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return [o.outputs[0] for o in outputs]


@pytest.mark.parametrize("backend", ["TRITON_ATTN", "FLASHINFER"])
@pytest.mark.parametrize("architecture", list(configs()))
def test_graphs_on_gpu_backends_equal_torch_sdpa(tmp_path, architecture, backend):
    if backend == "FLASHINFER":
        pytest.importorskip("flashinfer")
    config = configs()[architecture]
    config.architectures = [architecture]
    save_random(config, tmp_path)
    reference = run(tmp_path, "TORCH_SDPA", enforce_eager=True)
    for ours, theirs in zip(run(tmp_path, backend), reference):
        assert_same_greedy_up_to_near_tie(ours, theirs)


@pytest.mark.parametrize("architecture", list(configs()))
def test_dummy_weights_run(tmp_path, architecture):
    config = configs()[architecture]
    config.architectures = [architecture]
    config.save_pretrained(tmp_path)
    llm = LLM(model=str(tmp_path), dtype="bfloat16", load_format="dummy", skip_tokenizer_init=True, max_num_seqs=8)
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [8] * len(PROMPTS)
