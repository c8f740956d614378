import torch
from torch import nn


class MergedLinear(nn.Linear):
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
