"""TORCH_SDPA against the plain fp32 paged-attention reference, on the CPU."""
import pytest
import torch
from llmserve.plugins.conformance import check_backend

from llmserve.backends.torch_sdpa import TorchSdpaBackend

MIXED = [(0, 23), (37, 20), (50, 1), (0, 1), (16, 1), (64, 9)]  # (cached tokens, new tokens)


@pytest.mark.parametrize("window", [None, 21])
@pytest.mark.parametrize("softcap, scale", [(None, None), (50.0, 0.3), (2.0, None)])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 64), (3, 1, 96), (2, 2, 256)])
def test_matches_reference(window, softcap, scale, heads, kv_heads, head_dim):
    check_backend(TorchSdpaBackend, torch.float32, heads, kv_heads, head_dim, 16, MIXED, window, "cpu",
                  softcap=softcap, scale=scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 4, 128)])
def test_half_precision_on_the_cpu_matches_reference(dtype, heads, kv_heads, head_dim):
    """Decode rows (computed in fp32 on the CPU) and prefill chunks, in bf16 and fp16."""
    check_backend(TorchSdpaBackend, dtype, heads, kv_heads, head_dim, 16, MIXED, None, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window, softcap, scale", [(None, None, None), (21, 2.0, 0.3)])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 64), (3, 1, 96)])
def test_fp8_cache(dtype, window, softcap, scale, heads, kv_heads, head_dim):
    """Written scaled in fp8 as torch converts, read back with the scale (check_scaled_cache): prefill chunks and the
    decode rows the CPU computes in fp32."""
    check_backend(TorchSdpaBackend, dtype, heads, kv_heads, head_dim, 16, MIXED, window, "cpu", softcap=softcap,
                  scale=scale, kv_cache_dtype=torch.float8_e4m3fn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window, softcap", [(None, None), (21, 2.0)])
def test_attention_sinks(dtype, window, softcap):
    """gpt-oss's sinks: a logit per head in each softmax's denominator (plain torch: SDPA has no such term)."""
    check_backend(TorchSdpaBackend, dtype, 4, 2, 64, 16, MIXED, window, "cpu", softcap=softcap, sinks=True)
    check_backend(TorchSdpaBackend, dtype, 4, 2, 64, 16, MIXED, window, "cpu", softcap=softcap, sinks=True,
                  kv_cache_dtype=torch.float8_e4m3fn)
