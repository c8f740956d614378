"""Which fused kernels run a layer's elementwise work on a tensor: Triton's on a GPU, the C++ ones on the CPU, or
none (torch ops). Both modules offer rms_norm, qk_rotary_ and silu_and_mul with the same signatures."""
from types import ModuleType

import torch

from llmserve.models.layers import cpu_ops, triton_ops


def kernels_for(x: torch.Tensor) -> ModuleType | None:
    if triton_ops.fused(x):
        return triton_ops
    if cpu_ops.fused(x):
        return cpu_ops
    return None
