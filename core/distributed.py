"""Tensor parallelism over torch.distributed: this process's rank, and the collectives the parallel layers make.

Every rank holds a slice of each layer (models/layers/linear.py) and runs the same step; a row-parallel layer ends in
one all-reduce, the LM head in one all-gather. With one rank (the default) nothing here communicates. The backend is
NCCL on CUDA devices and gloo on the CPU; the step's inputs travel from rank 0 over a gloo group in either case
(executor.py).
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    size: int = 1


_state = ParallelState()


def tp() -> ParallelState:
    return _state


def init(rank: int, size: int, init_method: str, device: torch.device) -> None:
    """Join the process group of `size` ranks (one per device) and make this process rank `rank` of it."""
    global _state
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            device_id=device if device.type == "cuda" else None)
    _state = ParallelState(rank, size)


def shutdown() -> None:
    global _state, _cpu_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _state, _cpu_group = ParallelState(), None


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _state.size > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Each rank's [.., n] into [.., size * n], rank order."""
    if _state.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def min_over_ranks(value: int) -> int:
    if _state.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=cpu_group())
    return int(t.item())


_cpu_group = None


def cpu_group():
    """A gloo group of all ranks, for host objects (the step's inputs) whatever the device."""
    global _cpu_group
    if _cpu_group is None:
        _cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _cpu_group


def split_evenly(total: int, what: str, size: int | None = None) -> int:
    """total / size, or a ValueError naming `what` when the ranks cannot share it evenly."""
    size = size or _state.size
    if total % size:
        raise ValueError(f"tensor_parallel_size {size} does not divide the model's {what} ({total})")
    return total // size
