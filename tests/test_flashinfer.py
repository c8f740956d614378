"""FLASHINFER (skipped without a CUDA GPU and flashinfer-python): its kernels against the fp32 reference, and the
engine with it against TRITON_ATTN on the same random weights, in bf16 (FlashInfer has no fp32 kernels)."""
import gc

import pytest
import torch
from llmserve.plugins.conformance import check_backend
from conftest import assert_same_greedy_up_to_near_tie
from test_gpu import PROMPTS, save_random, tiny

from llmserve import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
flashinfer_backend = pytest.importorskip("llmserve.backends.flashinfer")
pytest.importorskip("flashinfer")

MIXED = [(0, 552), (888, 480), (1200, 1), (0, 1), (384, 1), (1536, 216), (0, 0)]  # (cached, new); last: padding
DECODE = [(1680, 1), (120, 1), (3120, 1), (792, 1)]


# Each (head size, dtype, window or not) is a kernel that FlashInfer compiles on first use, 10 to 30 s each on a new
# machine: bf16 at every head size, fp16 and a sliding window at 128.
@pytest.mark.parametrize("head_dim, dtype, window", [(64, torch.bfloat16, None), (128, torch.bfloat16, None),
                                                     (256, torch.bfloat16, None), (128, torch.float16, None),
                                                     (128, torch.bfloat16, 500)])
def test_kernels_match_reference(head_dim, dtype, window):
    for block_size, requests in [(16, MIXED), (32, DECODE)]:
        check_backend(flashinfer_backend.FlashInferBackend, dtype, 32, 8, head_dim, block_size, requests, window)


def test_mqa_decode_and_prefill():
    check_backend(flashinfer_backend.FlashInferBackend, torch.bfloat16, 16, 1, 128, 16, MIXED)


@pytest.mark.parametrize("head_dim, dtype, window", [(128, torch.bfloat16, None), (64, torch.float16, 500)])
def test_fp8_cache(head_dim, dtype, window):
    """An fp8 cache planned as FlashInfer's kv_data_type, the layer's device scales applied around its kernels
    (check_scaled_cache: written as torch quantizes, read as the fp32 reference over the dequantized cache)."""
    for block_size, requests in [(16, MIXED), (32, DECODE)]:
        check_backend(flashinfer_backend.FlashInferBackend, dtype, 32, 8, head_dim, block_size, requests, window,
                      kv_cache_dtype=torch.float8_e4m3fn)


def run(folder, backend: str, **engine_args):
    llm = LLM(model=str(folder), dtype="bfloat16", skip_tokenizer_init=True, max_num_batched_tokens=128,
              max_num_seqs=8, attention_backend=backend, **engine_args)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return outputs


@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
@pytest.mark.parametrize("architecture, kv_cache_dtype", [("llama", "auto"), ("qwen3", "auto"), ("llama", "fp8")])
def test_engine_matches_triton_attn(tmp_path, architecture, kv_cache_dtype, eager):
    """With an fp8 cache both compute the scales from their first step (the same tokens) and share the write kernel."""
    save_random(tiny(architecture), tmp_path)
    expected = run(tmp_path, "TRITON_ATTN", kv_cache_dtype=kv_cache_dtype)
    for prompt, ours, theirs in zip(PROMPTS, run(tmp_path, "FLASHINFER", enforce_eager=eager,
                                                 kv_cache_dtype=kv_cache_dtype), expected):
        for token, mine, reference in zip(prompt[1:], ours.prompt_logprobs[1:], theirs.prompt_logprobs[1:]):
            assert abs(mine[token].logprob - reference[token].logprob) < 0.1
        assert_same_greedy_up_to_near_tie(ours.outputs[0], theirs.outputs[0])
