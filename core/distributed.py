"""Tensor and pipeline parallelism over torch.distributed: this process's place, and the collectives the layers make.

The world is pipeline_parallel_size stages of tensor_parallel_size ranks each; global rank = stage * tp + tp rank.
Within a stage every rank holds a slice of each of the stage's layers (models/layers/linear.py): a row-parallel
layer ends in one all-reduce over the stage's ranks, the LM head in one all-gather. Between stages each rank sends
its hidden states to the rank of the same TP index in the next stage. With one rank (the default) nothing here
communicates. The backend is NCCL on CUDA devices and gloo on the CPU; the step's inputs travel from rank 0 over a
gloo group of all ranks in either case (executor.py).
"""
import contextlib
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0  # within the tensor-parallel group (the stage)
    size: int = 1  # tensor_parallel_size
    stage: int = 0
    stages: int = 1  # pipeline_parallel_size
    expert_parallel: bool = False  # enable_expert_parallel: experts split whole over the stage's ranks

    @property
    def first_stage(self) -> bool:
        return self.stage == 0

    @property
    def last_stage(self) -> bool:
        return self.stage == self.stages - 1

    @property
    def global_rank(self) -> int:
        return self.stage * self.size + self.rank

    @property
    def world_size(self) -> int:
        return self.size * self.stages


_state = ParallelState()
_tp_group = None
_cpu_group = None  # a gloo group of all ranks, for host objects (the step's plan) whatever the device


def tp() -> ParallelState:
    return _state


@contextlib.contextmanager
def assume(state: ParallelState):
    """Layers built inside see `state` (to check, on the meta device, how a model splits before any rank starts)."""
    global _state
    previous, _state = _state, state
    try:
        yield
    finally:
        _state = previous


def init(global_rank: int, tp_size: int, pp_size: int, init_method: str, device: torch.device,
         backend: str, expert_parallel: bool = False) -> None:
    """Join the world of tp_size * pp_size ranks (one per device) as `global_rank`, and the groups of each stage;
    `backend` is the platform's (NCCL on CUDA devices, gloo on the CPU)."""
    global _state, _tp_group, _cpu_group
    dist.init_process_group(backend, init_method=init_method, rank=global_rank, world_size=tp_size * pp_size,
                            device_id=device if device.type != "cpu" else None)
    for stage in range(pp_size):  # every rank makes every group, in the same order
        group = dist.new_group(list(range(stage * tp_size, (stage + 1) * tp_size)))
        if stage == global_rank // tp_size:
            _tp_group = group
    _cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    _state = ParallelState(global_rank % tp_size, tp_size, global_rank // tp_size, pp_size, expert_parallel)


def shutdown() -> None:
    """Leave the process group. NCCL's communicators are aborted, not destroyed: destroying one waits for every rank to
    destroy theirs (a rank that died, or one that left first, never does); aborting is local, and ends kernels that
    still wait for a dead rank."""
    global _state, _tp_group, _cpu_group
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.destroy_process_group(_cpu_group)  # gloo: local
            dist.distributed_c10d._abort_process_group()
        else:
            dist.destroy_process_group()
    _state, _tp_group, _cpu_group = ParallelState(), None, None


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _state.size > 1:
        dist.all_reduce(x, group=_tp_group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Each rank of the stage's [.., n] into [.., size * n], rank order."""
    if _state.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.size)]
    dist.all_gather(parts, x.contiguous(), group=_tp_group)
    return torch.cat(parts, dim=-1)


def broadcast_from_first_rank(x: torch.Tensor) -> None:
    """x of the stage's first rank into x of its other ranks (on GPUs, queued on the stream: the host goes on)."""
    if _state.size > 1:
        dist.broadcast(x, _state.stage * _state.size, group=_tp_group)


def min_over_ranks(value: int) -> int:
    if _state.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_cpu_group)
    return int(t.item())


PLAN_TAG, HIDDEN_TAG = 1, 2  # tags keep the point-to-point streams apart where they share a gloo group


def send_to_next_stage(*tensors: torch.Tensor | None) -> None:
    """The stage's outputs to the same TP rank of the next stage (None sends nothing: the receiver expects none)."""
    peer = _state.global_rank + _state.size
    for t in tensors:
        if t is not None:
            dist.send(t.contiguous(), peer, tag=HIDDEN_TAG)


def receive_from_previous_stage(*like: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Tensors shaped and typed like `like` (None: none expected), from the same TP rank of the previous stage."""
    peer = _state.global_rank - _state.size
    received = []
    for t in like:
        if t is not None:
            t = torch.empty_like(t)
            dist.recv(t, peer, tag=HIDDEN_TAG)
        received.append(t)
    return received


def split_evenly(total: int, what: str) -> int:
    """total / tensor_parallel_size, or a ValueError naming `what` when the ranks cannot share it evenly."""
    if total % _state.size:
        raise ValueError(f"tensor_parallel_size {_state.size} does not divide the model's {what} ({total})")
    return total // _state.size


def stage_layers(num_layers: int) -> range:
    """The layers this pipeline stage runs: an even split, the first stages taking one more where it is uneven."""
    if num_layers < _state.stages:
        raise ValueError(f"pipeline_parallel_size {_state.stages} is larger than the model's {num_layers} layers")
    per, extra = divmod(num_layers, _state.stages)
    start = _state.stage * per + min(_state.stage, extra)
    return range(start, start + per + (1 if _state.stage < extra else 0))


def send_object(obj, ranks: range) -> tuple[list, tuple]:
    """`obj`, pickled once, to each of `ranks` over the gloo group without waiting: the sends to wait on, and the
    buffers they read (to keep until then)."""
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    size = torch.tensor([payload.numel()], dtype=torch.int64)
    works = [dist.isend(t, rank, group=_cpu_group, tag=PLAN_TAG) for rank in ranks for t in (size, payload)]
    return works, (size, payload)


def recv_object(src: int):
    size = torch.empty(1, dtype=torch.int64)
    dist.recv(size, src, group=_cpu_group, tag=PLAN_TAG)
    payload = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(payload, src, group=_cpu_group, tag=PLAN_TAG)
    return pickle.loads(payload.numpy().tobytes())
