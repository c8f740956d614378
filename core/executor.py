"""Tensor-parallel ranks 1..N-1 as worker processes on this machine (rank 0 is the engine's own ModelRunner).

Each worker joins the torch.distributed group (NCCL on GPUs, gloo on the CPU), builds its ModelRunner (its slice of
every layer, its share of the KV cache), then runs every step rank 0 plans: rank 0 broadcasts the step's StepPlan
(ids, positions, block tables, slot mapping, rows to sample) over a gloo group and all ranks execute it, meeting in
the same collectives. Only rank 0 samples. A worker that dies is named by the next step, which fails instead of
waiting for it.
"""
import logging
import os
import pickle
import socket
import subprocess
import sys
import weakref

import torch
import torch.distributed as dist

from llmserve import distributed
from llmserve.config import EngineConfig

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(platform, rank: int) -> torch.device:
    device = platform.device()
    return torch.device(device.type, rank) if device.type == "cuda" else device


def check_fits(model_cls, hf_config, size: int) -> None:
    """Build the model on the meta device as rank 0 of `size` would: a size that does not divide its heads (or
    whatever else its layers split) raises the layers' own ValueError before any process starts."""
    distributed._state = distributed.ParallelState(0, size)
    try:
        with torch.device("meta"):
            model_cls(hf_config, torch.float32)
    finally:
        distributed._state = distributed.ParallelState()


class WorkerDied(RuntimeError):
    """A tensor-parallel rank exited: the engine cannot run another step."""


class Workers:
    """Ranks 1..size-1 of a tensor-parallel engine, seen from rank 0."""

    def __init__(self, config: EngineConfig, model_path: str, hf_config, platform) -> None:
        from llmserve.plugins.select import model_class

        size = config.tensor_parallel_size
        device = rank_device(platform, 0)
        if device.type == "cuda" and size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size {size} needs {size} GPUs; this machine has "
                             f"{torch.cuda.device_count()}")
        check_fits(model_class(hf_config), hf_config, size)
        init_method = f"tcp://127.0.0.1:{free_port()}"
        # Fresh interpreters, not multiprocessing's spawn: that re-imports the user's __main__, which fails in a
        # script without a __main__ guard; fork would copy CUDA and OpenMP state that children cannot use.
        self.processes = []
        for rank in range(1, size):
            process = subprocess.Popen([sys.executable, "-c", "from llmserve.executor import worker_entry; "
                                        "worker_entry()"], stdin=subprocess.PIPE)
            process.stdin.write(pickle.dumps((rank, size, init_method, config, model_path)))
            process.stdin.close()
            self.processes.append(process)
        share_cpu_threads(device, size)
        distributed.init(0, size, init_method, device)
        self.stop = weakref.finalize(self, stop_workers, self.processes)  # on stop() or when rank 0 lets go

    def check_alive(self) -> None:
        for rank, p in enumerate(self.processes, start=1):
            if p.poll() is not None:
                raise WorkerDied(f"tensor-parallel rank {rank} (pid {p.pid}) exited with code {p.returncode}; the "
                                   "engine cannot go on without it")

    def send(self, plan) -> None:
        """The step's plan to every other rank (None: stop)."""
        self.check_alive()
        try:
            dist.broadcast_object_list([plan], src=0, group=distributed.cpu_group())
        except RuntimeError:
            self.check_alive()  # a rank that died mid-step is the reason: name it
            raise



def stop_workers(processes) -> None:
    """Tell live workers to leave their loop, wait for them (terminate the stuck), leave the process group."""
    try:
        if dist.is_initialized() and all(p.poll() is None for p in processes):
            dist.broadcast_object_list([None], src=0, group=distributed.cpu_group())
    finally:
        for p in processes:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        distributed.shutdown()


def share_cpu_threads(device: torch.device, size: int) -> None:
    """CPU ranks share the machine's cores: each takes its part (oversubscribed ranks slow every collective)."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))


def worker_entry() -> None:
    """A worker process's start: its arguments come pickled on stdin from rank 0 (a process this machine started)."""
    worker_main(*pickle.loads(sys.stdin.buffer.read()))


def worker_main(rank: int, size: int, init_method: str, config: EngineConfig, model_path: str) -> None:
    from llmserve.engine import resolve_max_model_len
    from llmserve.loader import load_hf_config
    from llmserve.model_runner import ModelRunner
    from llmserve.plugins.select import current_platform

    platform = current_platform()
    device = rank_device(platform, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    share_cpu_threads(device, size)
    distributed.init(rank, size, init_method, device)
    try:
        hf_config = load_hf_config(model_path)
        runner = ModelRunner(config, model_path, hf_config, platform, device)
        runner.prepare_decode(resolve_max_model_len(config, hf_config, runner.num_blocks))
        while True:
            plan = [None]
            dist.broadcast_object_list(plan, src=0, group=distributed.cpu_group())
            if plan[0] is None:
                break
            runner.execute(plan[0])
    finally:
        distributed.shutdown()
