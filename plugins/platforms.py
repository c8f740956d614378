"""The built-in platforms: the CPU here, CUDA and ROCm in cuda.py (imported only where they are asked about)."""
import math
import mmap
import os

import torch

from llmserve.interfaces import Platform
from llmserve.plugins import hookimpl


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    attention_backends = ("CPU_ATTN", "TORCH_SDPA")  # CPU_ATTN where its kernel can build
    default_kv_cache_bytes = 4 << 30

    @classmethod
    def is_current(cls) -> bool:
        return True  # the fallback when nothing else claims the machine

    @classmethod
    def default_dtype(cls) -> torch.dtype:
        return torch.float32

    @classmethod
    def kv_cache_bytes(cls, config, profile_step) -> int:
        return config.kv_cache_memory_bytes or cls.default_kv_cache_bytes

    @classmethod
    def bind_rank(cls, local_index: int, ranks_here: int) -> torch.device:
        # ranks on one machine share its cores: each takes its part (oversubscribed ranks slow every collective)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_here))
        return cls.device()

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


@hookimpl
def llmserve_platforms():
    return {"cpu": f"{__name__}:CpuPlatform", "cuda": "llmserve.plugins.cuda:CudaPlatform",
            "rocm": "llmserve.plugins.cuda:RocmPlatform"}
