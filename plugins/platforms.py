"""The built-in platforms: CPU, CUDA and ROCm."""
import math
import mmap

import torch

from llmserve.interfaces import Platform
from llmserve.plugins import hookimpl


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    attention_backends = ("TORCH_SDPA",)
    default_kv_cache_bytes = 4 << 30

    @classmethod
    def is_current(cls) -> bool:
        return True  # the fallback when nothing else claims the machine

    @classmethod
    def default_dtype(cls) -> torch.dtype:
        return torch.float32

    @classmethod
    def kv_cache_bytes(cls, config) -> int:
        return config.kv_cache_memory_bytes or cls.default_kv_cache_bytes

    @classmethod
    def prepare_model(cls, model: torch.nn.Module) -> None:
        for module in model.modules():
            if hasattr(module, "pack_for_cpu"):
                module.pack_for_cpu()

    @classmethod
    def zeroed_kv_cache(cls, shape, dtype, device):
        # An anonymous memory map reads as zeros and gets its pages on first touch: no upfront memset of gigabytes.
        buffer = mmap.mmap(-1, math.prod(shape) * dtype.itemsize)
        return torch.frombuffer(buffer, dtype=dtype).view(shape)


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    # By measurement (docs/benchmarks.md, H200): TRITON_ATTN is within 4% of FLASHINFER end to end and compiles in
    # seconds, FLASHINFER for minutes on a new machine; FLASH_ATTN (FA4 on Hopper, no split-KV) decodes at 0.8x.
    attention_backends = ("TRITON_ATTN", "FLASHINFER", "FLASH_ATTN", "TORCH_SDPA")
    max_num_batched_tokens = 8192  # prefill chunks large enough to keep a GPU's matmuls busy

    @classmethod
    def is_current(cls) -> bool:
        return torch.version.hip is None and torch.cuda.is_available()

    @classmethod
    def kv_cache_bytes(cls, config) -> int:
        """What gpu_memory_utilization leaves after the weights and the peak of the profiling step (torch's
        statistics) and the memory torch does not manage (the CUDA context, other processes)."""
        if config.kv_cache_memory_bytes:
            return config.kv_cache_memory_bytes
        free, total = torch.cuda.mem_get_info()
        not_torch = total - free - torch.cuda.memory_reserved()
        return int(total * config.gpu_memory_utilization) - torch.cuda.max_memory_allocated() - not_torch


class RocmPlatform(CudaPlatform):
    name = "rocm"
    attention_backends = ("ROCM_ATTN", "TRITON_ATTN", "TORCH_SDPA")

    @classmethod
    def is_current(cls) -> bool:
        return torch.version.hip is not None and torch.cuda.is_available()


@hookimpl
def llmserve_platforms():
    return {p.name: f"{__name__}:{p.__name__}" for p in (CpuPlatform, CudaPlatform, RocmPlatform)}
