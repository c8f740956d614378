"""The engine on a CUDA GPU (skipped without one): TRITON_ATTN with and without CUDA graphs (whole for decode steps,
in pieces for steps with prompt tokens) equals the TORCH_SDPA path and HF transformers on the same random weights, in
float32, for mixed batches of prefill chunks and decodes."""
import gc

import pytest
import torch
from conftest import hf_greedy

from llmserve import LLM, SamplingParams
from llmserve.plugins.conformance import save_random_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SHARED = list(range(300, 348))  # a 48-token prefix shared by some prompts: prefix-cache hits mid-batch
PROMPTS = [[5, 17, 300, 4000, 12], list(range(200, 290)), [42] * 7, SHARED + [7, 8, 9], SHARED + list(range(50)),
           list(range(1000, 1400)), [11, 12]]


save_random = save_random_checkpoint


def tiny(architecture: str):
    from transformers import LlamaConfig, Qwen3Config

    args = dict(vocab_size=5000, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=8,
                num_key_value_heads=2, head_dim=64, max_position_embeddings=2048)
    return LlamaConfig(**args) if architecture == "llama" else Qwen3Config(**args, tie_word_embeddings=True)


def run(folder, **engine_args) -> list[list[int]]:
    llm = LLM(model=str(folder), dtype="float32", skip_tokenizer_init=True, max_num_batched_tokens=128,
              max_num_seqs=8, **engine_args)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert llm.engine.stats["max_batch_size"] > 1
    del llm  # free its KV cache before the next engine measures the free memory
    gc.collect()
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
def test_triton_attn_with_and_without_graphs_equals_sdpa_and_hf(tmp_path, architecture):
    from transformers import AutoModelForCausalLM

    save_random(tiny(architecture), tmp_path)
    reference = run(tmp_path, attention_backend="TORCH_SDPA", enforce_eager=True)
    # graphs for decode steps only, then also for steps with prompt tokens, in pieces (the default: every step here)
    assert run(tmp_path, attention_backend="TRITON_ATTN", max_graph_prefill_tokens=0) == reference
    assert run(tmp_path, attention_backend="TRITON_ATTN") == reference
    assert run(tmp_path, attention_backend="TRITON_ATTN", enforce_eager=True) == reference
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).cuda().eval()
    hf.generation_config.eos_token_id = None
    for prompt, ours in zip(PROMPTS, reference):
        assert_equal_up_to_near_tie(hf, prompt, ours)


def assert_equal_up_to_near_tie(hf, prompt: list[int], ours: list[int]) -> None:
    """HF's greedy tokens equal ours, or first differ where HF's own top two logits are a near tie (there the
    order of a float reduction decides, and the sequences go separate ways after)."""
    theirs = hf_greedy(hf, prompt, len(ours))[0]
    if theirs == ours:
        return
    j = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + ours[:j]], device="cuda")).logits[0, -1].float()
    gap = (logits[theirs[j]] - logits[ours[j]]).item()
    assert gap < 1e-4 * max(1.0, logits.abs().max().item()), (j, gap)


def test_kv_cache_too_large_is_a_clear_error(tmp_path):
    save_random(tiny("llama"), tmp_path)
    total = torch.cuda.mem_get_info()[1]
    with pytest.raises(ValueError, match="kv_cache_memory_bytes|gpu_memory_utilization"):
        LLM(model=str(tmp_path), skip_tokenizer_init=True, gpu_memory_utilization=0.0001)
    with pytest.raises(ValueError, match="GiB"):
        LLM(model=str(tmp_path), skip_tokenizer_init=True, kv_cache_memory_bytes=2 * total)
