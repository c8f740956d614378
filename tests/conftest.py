import os

import pytest
import torch

from llmserve import LLM, SamplingParams

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "1, 2, 3, 4,",
    "Write a haiku about the sea.",
    "The quick brown fox jumps over the lazy dog. " * 12,
    "Translate to French: I love cheese.",
    "Q: What is 2+2?\nA:",
    "In 1492,",
    "The meaning of life is",
    "import numpy as np\n",
    "A list of prime numbers: 2, 3, 5, 7, 11," * 6,
]


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


@pytest.fixture(scope="session")
def llm() -> LLM:
    """The embedded default model (SmolLM2-135M-Instruct GGUF), float32."""
    return LLM(dtype="float32")


@pytest.fixture(scope="session")
def hf_model():
    """HF transformers reading the same GGUF file by itself: the reference."""
    from transformers import AutoModelForCausalLM

    from llmserve.loader import default_model_file

    path = default_model_file()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    model.generation_config.eos_token_id = None  # EOS ignored, as in `greedy`
    return model.eval()


def hf_greedy(model, token_ids: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """HF's greedy continuation and the logprob of each chosen token."""
    out = model.generate(torch.tensor([token_ids], device=model.device), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(token_ids):].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


# Token-id prompts of mixed lengths, each with its own max_tokens: the 90-token one crosses the short windows the
# random configs set, and the batch mixes prefill lengths and finishing times.
RANDOM_MODEL_PROMPTS = [[5, 17, 300, 4000, 12], list(range(200, 290)), [42] * 7, list(range(1000, 1033))]
RANDOM_MODEL_MAX_TOKENS = [12, 6, 9, 3]


def save_random_model(config, folder, **save_kwargs) -> None:
    """Random weights for an HF config, saved by transformers (safetensors unless save_kwargs say otherwise), with the
    embedded model's tokenizer."""
    from llmserve.loader import find_model, load_tokenizer
    from llmserve.plugins.conformance import save_random_checkpoint

    save_random_checkpoint(config, folder, layer_norms_near_one=True, **save_kwargs)
    load_tokenizer(find_model(None)).save_pretrained(folder)


def hf_reference(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def assert_greedy_matches_hf(config, folder, **llm_kwargs) -> None:
    """Random weights for `config`, saved by HF: our greedy tokens on RANDOM_MODEL_PROMPTS (one batch, each prompt
    with its own max_tokens) equal HF's. llm_kwargs go to LLM (e.g. attention_backend)."""
    save_random_model(config, folder)
    params = [greedy(n) for n in RANDOM_MODEL_MAX_TOKENS]
    ours = LLM(model=str(folder), dtype="float32", **llm_kwargs).generate(RANDOM_MODEL_PROMPTS, params,
                                                                           use_tqdm=False)
    reference = hf_reference(folder)
    for prompt, n, out in zip(RANDOM_MODEL_PROMPTS, RANDOM_MODEL_MAX_TOKENS, ours):
        assert out.outputs[0].token_ids == hf_greedy(reference, prompt, n)[0], f"prompt of {len(prompt)} tokens"


def assert_same_greedy_up_to_near_tie(ours, theirs) -> None:
    """Equal greedy tokens (CompletionOutputs with logprobs), or a first difference where ours was among the
    reference's top logprobs, within bf16 noise of its choice."""
    if ours.token_ids == theirs.token_ids:
        return
    j = next(i for i, (a, b) in enumerate(zip(ours.token_ids, theirs.token_ids)) if a != b)
    top = theirs.logprobs[j]
    assert ours.token_ids[j] in top and abs(top[ours.token_ids[j]].logprob - top[theirs.token_ids[j]].logprob) < 0.1
