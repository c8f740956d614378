import torch
import torch.nn.functional as F

from llmserve.models.layers import triton_ops


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x [T, 2 * size] = [gate | up] (the gated MLP's activation)."""
    if triton_ops.fused(x):
        return triton_ops.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
