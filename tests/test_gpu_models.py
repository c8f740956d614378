"""Every architecture on a CUDA GPU in bfloat16 (skipped without one): TRITON_ATTN, FLASHINFER and FLASH_ATTN with CUDA
graphs give TORCH_SDPA's greedy tokens on the same random weights, up to bf16 near ties, or refuse the model with the reason."""
import gc

import pytest
import torch
from conftest import assert_same_greedy_up_to_near_tie
from llmserve.plugins.conformance import model_configs as configs
from test_gpu import PROMPTS, save_random

from llmserve import LLM, SamplingParams
from llmserve.backends.flash_attn import pick
from llmserve.interfaces import AttentionSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run(folder, backend: str, **engine_args):
    llm = LLM(model=str(folder), dtype="bfloat16", skip_tokenizer_init=True, max_num_batched_tokens=128,
              max_num_seqs=8, attention_backend=backend, **engine_args)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return [o.outputs[0] for o in outputs]


@pytest.mark.parametrize("backend", ["TRITON_ATTN", "FLASHINFER", "FLASH_ATTN"])
@pytest.mark.parametrize("architecture", list(configs()))
def test_graphs_on_gpu_backends_equal_torch_sdpa(tmp_path, architecture, backend):
    if backend == "FLASHINFER":
        pytest.importorskip("flashinfer")
    if backend == "FLASH_ATTN" and not pick(AttentionSpec(4, 2, 64, torch.bfloat16, 16))[0]:
        pytest.skip("no FlashAttention implementation here")
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
