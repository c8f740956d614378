"""The CUDA platform (and ROCm, which runs through torch's CUDA API): device memory, pinned uploads, CUDA graphs.

CUDA graphs for decode steps: one graph per padded batch size, replayed with the step's inputs copied in. A decode
step of B requests runs the graph of the smallest captured size >= B. The runner pads the batch to that size
(padding rows: token 0 at position 0, no KV write, one key read from block 0) and the backend writes the step's
metadata into the graph's own tensors (`build_graph_metadata(out=...)`). With tensor parallelism every rank captures
the same sizes in the same order, and each graph holds the NCCL all-reduces of its step.

Steps with prompt tokens (prefill, chunked prefill beside decodes) run in graph pieces, one set per padded token count:
the model is captured as one graph per stretch between attention layers, and each layer's attention runs eagerly
between the pieces with the step's own metadata (its shapes vary with the requests; the rest of the model only with
the token count). The pieces hand attention its inputs and take its output through static buffers. The runner pads
the step with one request of the missing tokens (no KV write, keys read from block 0).
"""
import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from llmserve.interfaces import BatchLayout, Platform
from llmserve.models.layers.attention import Attention

logger = logging.getLogger(__name__)


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    # By measurement (docs/benchmarks.md, H200): TRITON_ATTN is within 4% of FLASHINFER end to end and compiles in
    # seconds, FLASHINFER for minutes on a new machine; FLASH_ATTN (FA4 on Hopper, no split-KV) decodes at 0.8x.
    attention_backends = ("TRITON_ATTN", "FLASHINFER", "FLASH_ATTN", "TORCH_SDPA")
    max_num_batched_tokens = 8192  # prefill chunks large enough to keep a GPU's matmuls busy
    distributed_backend = "nccl"
    async_scheduling = True
    ray_resource = "GPU"

    @classmethod
    def is_current(cls) -> bool:
        return torch.version.hip is None and torch.cuda.is_available()

    @classmethod
    def device_count(cls) -> int:
        return torch.cuda.device_count()

    @classmethod
    def bind_rank(cls, local_index: int, ranks_here: int) -> torch.device:
        device = torch.device("cuda", local_index)
        torch.cuda.set_device(device)
        return device

    @classmethod
    def kv_cache_bytes(cls, config, profile_step) -> int:
        """What gpu_memory_utilization leaves after the weights and the peak of the profiling step (torch's
        statistics) and the memory torch does not manage (the CUDA context, other processes)."""
        if config.kv_cache_memory_bytes:
            return config.kv_cache_memory_bytes
        torch.cuda.reset_peak_memory_stats()
        profile_step()
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        not_torch = total - free - torch.cuda.memory_reserved()
        return int(total * config.gpu_memory_utilization) - torch.cuda.max_memory_allocated() - not_torch

    @classmethod
    def memory_info(cls, device: torch.device) -> tuple[int, int]:
        return torch.cuda.mem_get_info(device)

    @classmethod
    def host_uploads(cls, device: torch.device) -> "PinnedUploads":
        return PinnedUploads(64 << 20, device)

    @classmethod
    def decode_graphs(cls, model, backend, max_batch, max_model_len, block_size, device,
                      max_prefill_tokens: int = 0) -> "DecodeGraphs | None":
        if not backend.supports_cuda_graphs:
            return None
        return DecodeGraphs(model, backend, max_batch, max_model_len, block_size, device, max_prefill_tokens)

    @classmethod
    def synchronize(cls, device: torch.device) -> None:
        torch.cuda.synchronize(device)


class RocmPlatform(CudaPlatform):
    name = "rocm"
    attention_backends = ("ROCM_ATTN", "TRITON_ATTN", "TORCH_SDPA")

    @classmethod
    def is_current(cls) -> bool:
        return torch.version.hip is not None and torch.cuda.is_available()


class PinnedUploads:
    """Host arrays to the device through two pinned buffers used in turn, one per step: a copy never waits for
    the GPU work queued before it (a pageable copy would), and a buffer is rewritten only two steps later,
    once the GPU has done the step that read it (usually long since: the engine reads each step's samples; a
    prefill step samples nothing, so the event is what keeps the host from running further ahead)."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.done = [torch.cuda.Event(), torch.cuda.Event()]  # recorded after the work queued with each buffer
        self.device, self.turn, self.offset = device, 0, 0

    def next_step(self, wait: Callable[[torch.cuda.Event], None] | None = None) -> None:
        """Switch buffers, waiting for the step that last used the other one (through `wait` when given)."""
        self.done[self.turn].record()
        self.turn, self.offset = self.turn ^ 1, 0
        (wait or torch.cuda.Event.synchronize)(self.done[self.turn])

    def stage(self, array: np.ndarray) -> torch.Tensor:
        """`array` copied into this step's pinned buffer (a pageable tensor when it does not fit)."""
        array = np.ascontiguousarray(array)
        start = -(-self.offset // 16) * 16
        buffer = self.buffers[self.turn]
        if start + array.nbytes > buffer.numel():
            return torch.from_numpy(array)
        self.offset = start + array.nbytes
        staged = buffer[start:self.offset]
        staged.numpy()[:] = array.reshape(-1).view(np.uint8)
        return staged.view(torch.from_numpy(array[:0]).dtype).view(array.shape)

    def __call__(self, array: np.ndarray) -> torch.Tensor:
        return self.stage(array).to(self.device, non_blocking=True)


def capture_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 256, 16)) + list(range(256, 1025, 64))
    return [s for s in sizes if s < max_batch] + [max_batch]


def piece_sizes(max_tokens: int) -> list[int]:
    sizes = [16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096]
    return [s for s in sizes if s < max_tokens] + ([max_tokens] if max_tokens else [])


@dataclass
class Pieces:
    """One token count's graph pieces: graphs[i] ends where layers[i]'s attention starts; the last one ends the model."""

    graphs: list[torch.cuda.CUDAGraph]
    layers: list[Attention]
    hidden: torch.Tensor | None = None


class DecodeGraphs:
    def __init__(self, model, backend, max_batch: int, max_model_len: int, block_size: int, device: torch.device,
                 max_prefill_tokens: int = 0) -> None:
        self.model, self.backend, self.device, self.block_size = model, backend, device, block_size
        self.sizes = capture_sizes(max_batch)
        self.piece_sizes = piece_sizes(max_prefill_tokens)
        self.max_blocks = math.ceil(max_model_len / block_size)
        largest = max(max_batch, max_prefill_tokens)
        self.input_ids = torch.zeros(largest, dtype=torch.int64, device=device)
        self.positions = torch.zeros(largest, dtype=torch.int64, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, object, torch.Tensor]] = {}
        self.pieces: dict[int, Pieces] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.layers = [m for m in model.modules() if isinstance(m, Attention)]
        first = self.layers[0]
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        buffer = lambda heads: torch.zeros(max_prefill_tokens, heads * first.head_dim, dtype=dtype, device=device)
        # what the pieces hand each layer's attention (q, k, v) and take from it (out)
        self.q, self.k, self.v, self.out = (buffer(first.num_heads), buffer(first.num_kv_heads),
                                            buffer(first.num_kv_heads), buffer(first.num_heads))

    def padded_size(self, query_lens: np.ndarray) -> int | None:
        """The captured size a batch runs at, or None when it must run eagerly (not all decode, or too large)."""
        if len(query_lens) > self.sizes[-1] or int(query_lens.max()) != 1:
            return None
        return next(s for s in self.sizes if s >= len(query_lens))

    def padded_tokens(self, num_tokens: int) -> int | None:
        """The token count a step with prompt tokens runs its graph pieces at, or None when it must run eagerly."""
        return next((s for s in self.piece_sizes if s >= num_tokens), None)

    def dummy_layout(self, size: int) -> BatchLayout:
        slots = torch.full((size,), -1, dtype=torch.int64, device=self.device)
        return BatchLayout(np.ones(size, dtype=np.int64), np.zeros(size, dtype=np.int64), [[] for _ in range(size)],
                           slots, self.block_size, self.device)

    @torch.inference_mode()
    def run_each_size(self) -> None:
        """One eager decode step of padding rows at each size, at the longest context: compiles every kernel
        variant a decode step can need (without graphs, the KV split varies with the batch)."""
        metadata = [self.backend.build_graph_metadata(self.dummy_layout(size), self.max_blocks) for size in self.sizes]
        for size, md in zip(self.sizes, metadata):
            self.model(self.input_ids[:size], self.positions[:size], md)
        # Only now may the metadata go: a backend's library may still be copying from host buffers it holds.
        torch.cuda.synchronize()

    @torch.inference_mode()
    def capture(self) -> None:
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory (one pool for all)
            metadata = self.backend.build_graph_metadata(self.dummy_layout(size), self.max_blocks)
            self.model(self.input_ids[:size], self.positions[:size], metadata)  # warm-up (and kernel compiles)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                hidden = self.model(self.input_ids[:size], self.positions[:size], metadata)
            self.graphs[size] = (graph, metadata, hidden)
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)
        for size in reversed(self.piece_sizes):
            self.capture_pieces(size)
        torch.cuda.synchronize()
        if self.piece_sizes:
            logger.info("captured CUDA graph pieces for steps with prompt tokens, at token counts %s",
                        self.piece_sizes)

    def prefill_layout(self, size: int) -> BatchLayout:
        """One request of `size` new tokens (no KV write; its keys are read from block 0)."""
        slots = torch.full((size,), -1, dtype=torch.int64, device=self.device)
        return BatchLayout(np.array([size]), np.zeros(1, dtype=np.int64), [[0] * -(-size // self.block_size)], slots,
                           self.block_size, self.device)

    def capture_pieces(self, size: int) -> None:
        ids, positions = self.input_ids[:size], self.positions[:size]
        self.model(ids, positions, self.backend.build_metadata(self.prefill_layout(size)))  # warm-up
        torch.cuda.synchronize()
        pieces = Pieces([torch.cuda.CUDAGraph()], [])

        def split(layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            for buffer, value in ((self.q, q), (self.k, k), (self.v, v)):
                buffer[:size].copy_(value.reshape(size, -1))  # a model may hand them split into heads
            pieces.graphs[-1].capture_end()
            pieces.layers.append(layer)
            pieces.graphs.append(torch.cuda.CUDAGraph())
            pieces.graphs[-1].capture_begin(pool=self.pool)
            return self.out[:size]

        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        for layer in self.layers:
            layer.graph_split = split
        try:
            with torch.cuda.stream(stream):
                pieces.graphs[0].capture_begin(pool=self.pool)
                pieces.hidden = self.model(ids, positions, None)
                pieces.graphs[-1].capture_end()
        finally:
            for layer in self.layers:
                layer.graph_split = None
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.pieces[size] = pieces

    def run_pieces(self, layout: BatchLayout, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The hidden states of a step padded to a piece size: each piece, then its layer's attention, eagerly."""
        size = len(input_ids)
        pieces = self.pieces[size]
        self.input_ids[:size].copy_(input_ids, non_blocking=True)
        self.positions[:size].copy_(positions, non_blocking=True)
        metadata = self.backend.build_metadata(layout)
        q, k, v, out = self.q[:size], self.k[:size], self.v[:size], self.out[:size]
        for graph, layer in zip(pieces.graphs, pieces.layers):
            graph.replay()
            out.copy_(layer.attend(q, k, v, metadata))
        pieces.graphs[-1].replay()
        return pieces.hidden

    def release(self) -> None:
        """Free the graphs (before a process group whose NCCL communicators they use is torn down)."""
        self.graphs.clear()
        self.pieces.clear()

    def run(self, layout: BatchLayout, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The hidden states of a padded decode batch (layout, ids and positions already padded to a size)."""
        size = len(layout.query_lens)
        graph, metadata, hidden = self.graphs[size]
        self.input_ids[:size].copy_(input_ids, non_blocking=True)
        self.positions[:size].copy_(positions, non_blocking=True)
        self.backend.build_graph_metadata(layout, self.max_blocks, out=metadata)
        graph.replay()
        return hidden
