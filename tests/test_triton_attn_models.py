"""Every architecture through TRITON_ATTN's kernels against HF transformers, on the CPU in Triton's interpreter (or
compiled, on a GPU): the engine path a GPU takes for attention, at float32 and small shapes."""
import os

import pytest
import torch
from conftest import assert_greedy_matches_hf
from llmserve.plugins.conformance import model_configs as configs

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # triton reads it when the kernels are first defined
pytest.importorskip("triton")

from llmserve.backends.triton_attn import TritonAttnBackend  # noqa: E402


@pytest.fixture
def triton_attn_on_cpu(monkeypatch):
    """TRITON_ATTN declares CUDA and ROCm; under the interpreter its kernels run on CPU tensors too."""
    monkeypatch.setattr(TritonAttnBackend, "platforms", TritonAttnBackend.platforms + ("cpu",))


@pytest.mark.parametrize("architecture", list(configs()))
def test_architecture_through_triton_attn_matches_hf(tmp_path, triton_attn_on_cpu, architecture):
    config = configs()[architecture]
    config.architectures = [architecture]
    assert_greedy_matches_hf(config, tmp_path, attention_backend="TRITON_ATTN")
