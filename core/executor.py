"""Tensor-parallel ranks 1..N-1 (rank 0 is the engine's own ModelRunner), as processes on this machine (`mp`) or as
Ray actors anywhere in a Ray cluster (`ray`, `pip install llmserve[ray]`).

Each worker joins the torch.distributed group (NCCL on GPUs, gloo on the CPU), builds its ModelRunner (its slice of
every layer, its share of the KV cache), then runs every step rank 0 plans: rank 0 sends the step's StepPlan (ids,
positions, block tables, slot mapping, rows to sample) to each rank over a gloo group without waiting, and all ranks
execute it, meeting in the same collectives. Only rank 0 samples; with async scheduling a step that continues the one
before takes its sampled tokens from rank 0 by one broadcast on the device. A worker that exits is named by the next
step, by rank 0's wait for a step's samples, or by the engine's idle health check, which raise WorkerDied instead of
waiting for it.
"""
import logging
import os
import pickle
import socket
import subprocess
import sys
import time
import weakref

import torch
import torch.distributed as dist

from llmserve import distributed
from llmserve.config import EngineConfig
from llmserve.plugins import hookimpl

logger = logging.getLogger(__name__)


class WorkerDied(RuntimeError):
    """A tensor-parallel rank exited: the engine cannot run another step."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def check_fits(model_cls, hf_config, config: EngineConfig) -> None:
    """Build the model on the meta device as rank 0 would: a size that does not divide its heads (or whatever else
    its layers split), or more stages than layers, raises the layers' own ValueError before any worker starts."""
    state = distributed.ParallelState(0, config.tensor_parallel_size, 0, config.pipeline_parallel_size,
                                      config.enable_expert_parallel)
    with distributed.assume(state), torch.device("meta"):
        model = model_cls(hf_config, torch.float32)
    from llmserve.models.layers.moe import FusedExperts

    if config.enable_expert_parallel and not any(isinstance(m, FusedExperts) for m in model.modules()):
        logger.warning("enable_expert_parallel: %s has no experts; its layers split over the ranks as usual",
                       model_cls.__name__)


class Workers:
    """The other ranks, seen from rank 0: started by a subclass, then sent each step's plan."""

    host = "127.0.0.1"  # where rank 0 listens for the group's rendezvous

    def __init__(self, config: EngineConfig, model_path: str, hf_config, platform) -> None:
        from llmserve.plugins.select import model_class

        tp_size, pp_size = config.tensor_parallel_size, config.pipeline_parallel_size
        self.size = tp_size * pp_size
        self.in_flight: list[tuple[list, tuple]] = []  # plan sends not yet done, with their buffers
        check_fits(model_class(hf_config), hf_config, config)
        self.platform = platform
        self.graphs: list = []  # rank 0's DecodeGraphs, released before the process group
        init_method = f"tcp://{self.host}:{free_port()}"
        self.start(config, model_path, init_method)
        distributed.init(0, tp_size, pp_size, init_method, platform.bind_rank(0, self.size),
                         platform.distributed_backend, config.enable_expert_parallel)

    def start(self, config: EngineConfig, model_path: str, init_method: str) -> None:
        raise NotImplementedError

    def exited(self) -> list[tuple[int, str]]:
        """(rank, how) of each worker that is gone."""
        raise NotImplementedError

    def check_alive(self) -> None:
        gone = self.exited()
        if gone:
            rank, how = gone[0]
            raise WorkerDied(f"tensor-parallel rank {rank} {how}; the engine cannot go on without it")

    def wait_for(self, event) -> None:
        """Wait for a step's event (None: nothing to wait for), naming a rank that dies meanwhile: on GPUs the step's
        collectives would wait for it forever."""
        if event is None:
            return
        checked = time.monotonic()
        while not event.query():
            if time.monotonic() - checked > 0.2:
                self.check_alive()
                checked = time.monotonic()
            time.sleep(0)  # let other threads (the server's) run

    def send(self, plan) -> None:
        """The step's plan to every other rank, without waiting for them: a later pipeline stage may still be
        busy with an earlier microbatch."""
        self.check_alive()
        try:
            self.in_flight = [(works, buffers) for works, buffers in self.in_flight
                              if not all(w.is_completed() for w in works)]
            self.in_flight.append(distributed.send_object(plan, range(1, self.size)))
        except RuntimeError:
            self.check_alive()  # a rank that died mid-step is the reason: name it
            raise


def tell_workers_to_stop(alive: bool) -> None:
    try:
        if alive and dist.is_initialized():
            works, _ = distributed.send_object(None, range(1, dist.get_world_size()))
            for work in works:
                work.wait()
    except RuntimeError:
        pass  # a rank went meanwhile: the caller ends them all anyway


class ProcessWorkers(Workers):
    """Workers as fresh interpreters on this machine, one device each (GPU `rank`, or a share of the CPU)."""

    def start(self, config: EngineConfig, model_path: str, init_method: str) -> None:
        devices = self.platform.device_count()
        if devices is not None and self.size > devices:
            raise ValueError(f"{self.size} ranks (tensor x pipeline parallel) need {self.size} devices; this machine "
                             f"has {devices} {self.platform.name} devices (a Ray cluster can bring more: "
                             "--distributed-executor-backend ray)")
        # Fresh interpreters, not multiprocessing's spawn: that re-imports the user's __main__, which fails in a
        # script without a __main__ guard; fork would copy CUDA and OpenMP state that children cannot use.
        self.processes = []
        for rank in range(1, self.size):
            process = subprocess.Popen([sys.executable, "-c", "from llmserve.executor import worker_entry; "
                                        "worker_entry()"], stdin=subprocess.PIPE)
            process.stdin.write(pickle.dumps((rank, self.size, init_method, config, model_path, rank)))
            process.stdin.close()
            self.processes.append(process)
        self.stop = weakref.finalize(self, stop_processes, self.processes, self.graphs,
                                     self.platform)  # on stop() or when rank 0 lets go

    def exited(self) -> list[tuple[int, str]]:
        return [(rank, f"(pid {p.pid}) exited with code {p.returncode}")
                for rank, p in enumerate(self.processes, start=1) if p.poll() is not None]


def release_graphs(graphs: list, platform) -> None:
    """A rank's captured graphs go before its process group: NCCL does not tear down a communicator that a graph
    still holds (it waits for ever)."""
    for g in graphs:
        g.release()
    graphs.clear()
    platform.synchronize(None)


def stop_processes(processes, graphs: list, platform) -> None:
    """Tell live workers to leave their loop, wait for them (kill the stuck), leave the process group."""
    try:
        tell_workers_to_stop(all(p.poll() is None for p in processes))
    finally:
        for p in processes:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        release_graphs(graphs, platform)
        distributed.shutdown()


class RayWorkers(Workers):
    """Workers as Ray actors, one placement-group bundle each (a GPU, or a CPU), wherever the cluster has room:
    the cluster at RAY_ADDRESS, else a local one. Every node needs llmserve and the model's files at the same path."""

    def __init__(self, config: EngineConfig, model_path: str, hf_config, platform) -> None:
        try:
            import ray
        except ImportError:
            raise ValueError("--distributed-executor-backend ray needs Ray: pip install 'llmserve[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False,
                     runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("LLMSERVE_")}})
        self.host = ray.util.get_node_ip_address()
        super().__init__(config, model_path, hf_config, platform)

    def start(self, config: EngineConfig, model_path: str, init_method: str) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ray = self.ray
        resource = self.platform.ray_resource
        bundle = {resource: 1, "CPU": 1} if resource else {"CPU": 1}
        self.group = ray.util.placement_group([bundle] * (self.size - 1),
                                              strategy=os.environ.get("LLMSERVE_RAY_PLACEMENT", "PACK"))
        ready, _ = ray.wait([self.group.ready()], timeout=300)
        if not ready:
            ray.util.remove_placement_group(self.group)
            raise ValueError(f"the Ray cluster has no room for {self.size - 1} workers of {bundle} each "
                             f"(ray.cluster_resources(): {ray.cluster_resources()})")
        device = {} if not resource else {"num_gpus": 1} if resource == "GPU" else {"resources": {resource: 1}}
        actor = ray.remote(num_cpus=1, **device)(RankActor)
        self.actors, self.runs = [], []
        for rank in range(1, self.size):
            strategy = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank - 1)
            handle = actor.options(scheduling_strategy=strategy, name=f"llmserve-tp{rank}-{os.getpid()}").remote()
            self.actors.append(handle)  # Ray shows each actor its own GPU as device 0
            self.runs.append(handle.run.remote(rank, self.size, init_method, config, model_path, 0))
        self.stop = weakref.finalize(self, stop_actors, ray, self.actors, self.runs, self.group, self.graphs,
                                     self.platform)

    def exited(self) -> list[tuple[int, str]]:
        done, _ = self.ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        gone = []
        for rank, run in enumerate(self.runs, start=1):
            if run in done:
                try:
                    self.ray.get(run)
                    how = "(a Ray actor) left its loop"
                except Exception as e:
                    how = f"(a Ray actor) died: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                gone.append((rank, how))
        return gone


def stop_actors(ray, actors, runs, group, graphs: list, platform) -> None:
    if not ray.is_initialized():  # Ray shut down first (at exit): it ended this job's actors itself
        distributed.shutdown()
        return
    try:
        done, _ = ray.wait(runs, num_returns=len(runs), timeout=0)
        tell_workers_to_stop(not done)
        ray.wait(runs, num_returns=len(runs), timeout=10)
    finally:
        for actor in actors:
            ray.kill(actor)
        ray.util.remove_placement_group(group)
        release_graphs(graphs, platform)
        distributed.shutdown()


class RankActor:
    """A Ray actor running one rank's worker loop (see worker_main)."""

    def run(self, *args) -> None:
        worker_main(*args)


def start_workers(config: EngineConfig, model_path: str, hf_config, platform) -> Workers:
    from llmserve.plugins.manager import registry

    executors = registry().of("executor")
    world = config.tensor_parallel_size * config.pipeline_parallel_size
    devices = platform.device_count()
    more_than_here = devices is not None and world > devices
    name = config.distributed_executor_backend or ("ray" if os.environ.get("RAY_ADDRESS") or more_than_here else "mp")
    if name not in executors:
        raise ValueError(f"unknown distributed_executor_backend {name!r}; registered: {', '.join(sorted(executors))}")
    return executors[name].load()(config, model_path, hf_config, platform)


@hookimpl
def llmserve_executors():
    return {"mp": f"{__name__}:ProcessWorkers", "ray": f"{__name__}:RayWorkers"}


def worker_entry() -> None:
    """A worker process's start: its arguments come pickled on stdin from rank 0 (a process this machine started)."""
    worker_main(*pickle.loads(sys.stdin.buffer.read()))


def worker_main(rank: int, size: int, init_method: str, config: EngineConfig, model_path: str,
                device_index: int) -> None:
    from llmserve.engine import resolve_max_model_len
    from llmserve.loader import load_hf_config
    from llmserve.model_runner import ModelRunner
    from llmserve.plugins.select import current_platform

    platform = current_platform(config.device)
    device = platform.bind_rank(device_index, size)
    distributed.init(rank, config.tensor_parallel_size, config.pipeline_parallel_size, init_method, device,
                     platform.distributed_backend, config.enable_expert_parallel)
    try:
        hf_config = load_hf_config(model_path)
        runner = ModelRunner(config, model_path, hf_config, platform, device)
        runner.prepare_decode(resolve_max_model_len(config, hf_config, runner.num_blocks))
        while (plan := distributed.recv_object(0)) is not None:
            runner.execute(plan)
        release_graphs([runner.graphs] if runner.graphs is not None else [], platform)
    finally:
        distributed.shutdown()
