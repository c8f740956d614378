import functools

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.distributed import all_gather_last_dim, all_reduce, split_evenly, tp
from llmserve.interfaces import QuantizationMethod



@functools.cache
def cpu_has_fast_half_matmul() -> bool:
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


class Linear(nn.Linear):
    """nn.Linear with a CPU fast path: the weight pre-packed once for oneDNN's GEMM (see pack_for_cpu). Replicated on
    every tensor-parallel rank; the parallel layers below hold slices. A quantization method (`quant`) may replace
    the weight by parameters of its own and do the multiplication."""

    packed_weight = None
    quant: QuantizationMethod | None = None

    def pack_for_cpu(self) -> None:
        """Pack the weight once into oneDNN's blocked layout: up to 2x faster than the unpacked GEMM at decode batch
        sizes.

        bf16 weights stay bf16 where the CPU multiplies bf16 (avx512_bf16): 1.4 to 1.9x faster than the fp32 packed
        GEMM and than torch's bf16 F.linear up to 64 rows, level at 512 (docs/benchmarks.md, issue 15). On CPUs
        without it, half-precision weights are packed as fp32: the products of half-precision values are exact in
        fp32 and the sums accumulate in fp32, as a native bf16 GEMM does, while torch's fallback kernel for those
        CPUs is several times slower.
        """
        if self.quant is not None:
            return
        weight = self.weight.detach()
        if weight.dtype == torch.bfloat16 and cpu_has_fast_half_matmul():
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        elif weight.dtype == torch.float32 or not cpu_has_fast_half_matmul():
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.float(), None)

    def project(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quant is not None:
            return self.quant.apply(self, x, bias)
        if self.packed_weight is None:
            return F.linear(x, self.weight, bias)
        dtype = self.packed_weight.dtype
        bias = None if bias is None else bias.to(dtype)
        out = torch.ops.mkldnn._linear_pointwise(x.to(dtype), self.packed_weight, bias, "none", [], "")
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x, self.bias)

    def load_full(self, kind: str, tensor: torch.Tensor) -> None:
        """Load the checkpoint's whole tensor for `kind` ("weight", "bias", a quantization method's): this rank's
        part of it."""
        target = getattr(self, kind)
        part = self.part_of(kind, self.checkpoint_rows(kind, tensor, self.out_features))
        if part.shape != target.shape:
            raise ValueError(f"{kind} has shape {tuple(tensor.shape)}, expected {self.full_shape(kind)}")
        with torch.no_grad():
            target.copy_(part)

    def checkpoint_rows(self, kind: str, tensor: torch.Tensor, rows: int) -> torch.Tensor:
        """A checkpoint tensor in the layout of the parameter: the quantization method's, output rows first."""
        return tensor if self.quant is None or kind == "bias" else self.quant.checkpoint_rows(kind, tensor, rows)

    def part_of(self, kind: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def full_shape(self, kind: str) -> tuple[int, ...]:
        return tuple(getattr(self, kind).shape)


def rank_slice(total: int, what: str) -> tuple[int, int]:
    """(start, length) of this rank's even share of `total` rows."""
    length = split_evenly(total, what)
    return tp().rank * length, length


class MergedLinear(Linear):
    """Several projections of one input stacked into one matmul (q/k/v, gate/up), column-parallel: each rank holds
    rows start:start + length of each projection (by default its even share; a KV head may be replicated instead);
    loaded shard by shard."""

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool = False,
                 shard_slices: list[tuple[int, int]] | None = None, what: str = "output features") -> None:
        self.shard_sizes = shard_sizes
        self.shard_slices = shard_slices or [rank_slice(size, what) for size in shard_sizes]
        lengths = [length for _, length in self.shard_slices]
        super().__init__(in_features, sum(lengths), bias=bias)
        self.shard_offsets = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
        self.unsplit_loaded: set[str] = set()  # a quantization method's tensors shared by the projections, loaded

    def load_shard(self, index: int, tensor: torch.Tensor, kind: str = "weight") -> None:
        if self.quant is not None and self.quant.unsplit(kind):  # the same for every projection: kept once
            target = getattr(self, kind)
            if kind in self.unsplit_loaded and not torch.equal(target, tensor.to(target.device, target.dtype)):
                raise ValueError(f"shard {index} of {kind} differs from another projection's, and the stacked "
                                 "projections share one")
            with torch.no_grad():
                target.copy_(tensor)
            self.unsplit_loaded.add(kind)
            return
        self.copy_shard(index, self.checkpoint_rows(kind, tensor, self.shard_sizes[index]), kind)

    def copy_shard(self, index: int, tensor: torch.Tensor, kind: str) -> None:
        if tensor.shape[0] != self.shard_sizes[index]:
            raise ValueError(f"shard {index} of {kind} has {tensor.shape[0]} rows, expected {self.shard_sizes[index]}")
        start, length = self.shard_slices[index]
        with torch.no_grad():
            getattr(self, kind)[self.shard_offsets[index]:self.shard_offsets[index + 1]].copy_(
                tensor[start:start + length])

    def load_full(self, kind: str, tensor: torch.Tensor) -> None:
        """The projections already stacked in the checkpoint (Phi-3's qkv_proj, GPT-2's c_attn)."""
        if self.quant is not None and self.quant.unsplit(kind):
            return self.load_shard(0, tensor, kind)
        tensor = self.checkpoint_rows(kind, tensor, sum(self.shard_sizes))
        if tensor.shape[0] != sum(self.shard_sizes):
            raise ValueError(f"{kind} has {tensor.shape[0]} rows, expected {sum(self.shard_sizes)}")
        for index, part in enumerate(tensor.split(self.shard_sizes)):
            self.copy_shard(index, part, kind)


class ColumnParallelLinear(MergedLinear):
    """Output features split over the ranks: each computes its slice of the output (no communication)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, [out_features], bias)


class RowParallelLinear(Linear):
    """Input features split over the ranks (the output of a column-parallel layer, sliced alike): each computes a
    partial sum, one all-reduce adds them, then the bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        self.full_in = in_features
        self.start, length = rank_slice(in_features, "input features")
        super().__init__(length, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tp().size == 1:
            return self.project(x, self.bias)
        out = all_reduce(self.project(x, None))
        return out if self.bias is None else out + self.bias

    def part_of(self, kind: str, tensor: torch.Tensor) -> torch.Tensor:
        where = self.quant.input_dim(kind) if self.quant is not None else (1, 1) if kind == "weight" else None
        if where is None:
            return tensor
        dim, per_index = where
        if self.start % per_index or self.in_features % per_index:
            raise ValueError(f"{kind}: this rank's input features {self.start}:{self.start + self.in_features} do not "
                             f"fall on its packing of {per_index}; use fewer tensor-parallel ranks")
        return tensor.narrow(dim, self.start // per_index, self.in_features // per_index)

    def full_shape(self, kind: str) -> tuple[int, ...]:
        if kind == "bias":
            return (self.out_features,)
        return (self.out_features, self.full_in) if self.quant is None else tuple(getattr(self, kind).shape)


def qkv_slices(num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[list[tuple[int, int]], int, int]:
    """This rank's rows of q, k and v, and its query and KV head counts: query heads split evenly; KV heads split
    evenly too, or, when there are fewer than ranks, each rank keeps the one its query heads use."""
    rank, size = tp().rank, tp().size
    heads = split_evenly(num_heads, "attention heads")
    if num_kv_heads >= size:
        kv_heads = split_evenly(num_kv_heads, "KV heads")
        kv_start = rank * kv_heads
    else:
        if size % num_kv_heads:
            raise ValueError(f"tensor_parallel_size {size} is neither a divisor nor a multiple of the model's "
                             f"{num_kv_heads} KV heads")
        kv_heads, kv_start = 1, rank * num_kv_heads // size
    kv = (kv_start * head_dim, kv_heads * head_dim)
    return [(rank * heads * head_dim, heads * head_dim), kv, kv], heads, kv_heads


class VocabParallelEmbedding(nn.Module):
    """The embedding table split by vocabulary rows over the ranks (padded to a multiple of them): each looks up the
    ids in its range, zeros elsewhere, and one all-reduce sums them."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.per_rank = -(-num_embeddings // tp().size)
        self.start = tp().rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, embedding_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if tp().size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return all_reduce(out)

    def load_full(self, kind: str, tensor: torch.Tensor) -> None:
        if tensor.shape != (self.num_embeddings, self.weight.shape[1]):
            raise ValueError(f"{kind} has shape {tuple(tensor.shape)}, expected "
                             f"{(self.num_embeddings, self.weight.shape[1])}")
        rows = tensor[self.start:self.start + self.per_rank]
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:len(rows)].copy_(rows)


class ParallelLMHead(Linear):
    """Logits split by vocabulary like VocabParallelEmbedding (so a tied head shares its weight): each rank computes
    its columns, one all-gather joins them."""

    def __init__(self, hidden_size: int, vocab_size: int, bias: bool = False) -> None:
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // tp().size)
        self.start = tp().rank * self.per_rank
        super().__init__(hidden_size, self.per_rank, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.project(x, self.bias)
        return logits if tp().size == 1 else all_gather_last_dim(logits)[..., :self.vocab_size]

    def load_full(self, kind: str, tensor: torch.Tensor) -> None:
        if tensor.shape[0] != self.vocab_size:
            raise ValueError(f"{kind} has {tensor.shape[0]} rows, expected {self.vocab_size}")
        rows = tensor[self.start:self.start + self.per_rank]
        with torch.no_grad():
            getattr(self, kind).zero_()
            getattr(self, kind)[:len(rows)].copy_(rows)
