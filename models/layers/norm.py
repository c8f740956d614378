import torch
from torch import nn

from llmserve.models.layers.fused import kernels_for


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset  # Gemma scales by (1 + weight)
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """RMS-normalise x (after adding residual, when given: then also return the new residual, which the fused
        kernels write into `residual` in place)."""
        if kernels := kernels_for(x):
            out = kernels.rms_norm(x, self.weight, self.eps, self.offset, residual)
            return out if residual is None else (out, residual)
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = (x32 * (self.weight.float() + self.offset)).to(dtype) if self.offset else self.weight * x32.to(dtype)
        return out if residual is None else (out, residual)
