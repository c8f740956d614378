import functools

import torch
import torch.nn.functional as F
from torch import nn

UPCAST_MIN_ROWS = 128  # below this a matmul is bound by reading the weight, and half-size weights win


@functools.cache
def cpu_has_fast_half_matmul() -> bool:
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


class Linear(nn.Linear):
    """nn.Linear that, on CPUs without bf16/fp16 matmul instructions, runs large half-precision matmuls in fp32.

    The products of half-precision values are exact in fp32 and the sum is accumulated in fp32, as a
    native bf16 GEMM does; torch's fallback kernel for those CPUs is several times slower.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype != torch.float32 and x.device.type == "cpu" and x.shape[0] >= UPCAST_MIN_ROWS
                and not cpu_has_fast_half_matmul()):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of one input stacked into one matmul (q/k/v, gate/up); loaded shard by shard."""

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shard_sizes), bias=bias)
        self.shard_offsets = [sum(shard_sizes[:i]) for i in range(len(shard_sizes) + 1)]

    def load_shard(self, index: int, tensor: torch.Tensor, kind: str = "weight") -> None:
        start, end = self.shard_offsets[index], self.shard_offsets[index + 1]
        target = getattr(self, kind)
        if tensor.shape[0] != end - start:
            raise ValueError(f"shard {index} of {kind} has {tensor.shape[0]} rows, expected {end - start}")
        with torch.no_grad():
            target[start:end].copy_(tensor)
