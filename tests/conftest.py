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
