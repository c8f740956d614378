import functools

import torch
import torch.nn.functional as F
from torch import nn



@functools.cache
def cpu_has_fast_half_matmul() -> bool:
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


class Linear(nn.Linear):
    """nn.Linear with a CPU fast path: the weight pre-packed once for oneDNN's GEMM (see pack_for_cpu)."""

    packed_weight = None

    def pack_for_cpu(self) -> None:
        """Pack the weight into oneDNN's blocked fp32 layout: up to 2x faster than MKL at decode batch sizes.

        Half-precision weights are packed as fp32 on CPUs without bf16/fp16 matmul instructions: the
        products of half-precision values are exact in fp32 and the sums accumulate in fp32, as a native
        bf16 GEMM does, while torch's fallback kernel for those CPUs is several times slower.
        """
        if self.weight.dtype == torch.float32 or not cpu_has_fast_half_matmul():
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().float(), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is None:
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return torch.ops.mkldnn._linear_pointwise(x.float(), self.packed_weight, bias, "none", [], "").to(x.dtype)


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
