"""CPU_ATTN (a C++ decode kernel over the paged cache; prefill rows through SDPA) against the plain fp32 paged-attention
reference, on the CPU, at several shapes, block sizes, windows and dtypes; and the engine with it against TORCH_SDPA."""
import pytest
import torch
from llmserve.plugins.conformance import check_backend

from llmserve import LLM, SamplingParams
from llmserve.backends.cpu_attn import CpuAttnBackend, kernel

MIXED = [(0, 23), (37, 20), (50, 1), (0, 1), (16, 1), (64, 9)]  # (cached tokens, new tokens)
DECODE = [(300, 1), (5, 1), (1000, 1), (17, 1), (0, 1), (130, 1)]

pytestmark = pytest.mark.skipif(isinstance(kernel(), Exception), reason="the C++ kernel did not build here")


@pytest.mark.parametrize("window", [None, 21])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 64), (3, 1, 96), (2, 2, 256), (9, 3, 64), (8, 1, 128)])
@pytest.mark.parametrize("requests", [MIXED, DECODE], ids=["mixed", "decode"])
def test_matches_reference(window, heads, kv_heads, head_dim, requests):
    check_backend(CpuAttnBackend, torch.float32, heads, kv_heads, head_dim, 16, requests, window, "cpu",
                  scale=0.3 if heads == 3 else None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 4, 128)])
def test_half_precision_matches_reference(dtype, block_size, heads, kv_heads, head_dim):
    check_backend(CpuAttnBackend, dtype, heads, kv_heads, head_dim, block_size, MIXED + DECODE, None, "cpu")


def test_the_engine_with_it_equals_torch_sdpa(llm):
    prompts = ["The capital of France is", "Once upon a time, in a land far away,", "1, 2, 3,"]
    params = SamplingParams(temperature=0, max_tokens=24)
    assert llm.engine.runner.backend.name == "TORCH_SDPA"  # the CPU's default
    ours = LLM(dtype="float32", attention_backend="CPU_ATTN")
    assert ours.engine.runner.backend.name == "CPU_ATTN"
    assert ([o.outputs[0].token_ids for o in ours.generate(prompts, params, use_tqdm=False)] ==
            [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
