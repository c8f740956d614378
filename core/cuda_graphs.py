"""CUDA graphs for decode steps: one graph per padded batch size, replayed with the step's inputs copied in.

A decode step of B requests runs the graph of the smallest captured size >= B. The runner pads the
batch to that size (padding rows: token 0 at position 0, no KV write, one key read from block 0) and
the backend writes the step's metadata into the graph's own tensors (`build_graph_metadata(out=...)`).
"""
import logging
import math

import numpy as np
import torch

from llmserve.interfaces import BatchLayout

logger = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 256, 16)) + list(range(256, 1025, 64))
    return [s for s in sizes if s < max_batch] + [max_batch]


class DecodeGraphs:
    def __init__(self, model, backend, max_batch: int, max_model_len: int, block_size: int,
                 device: torch.device) -> None:
        self.model, self.backend, self.device, self.block_size = model, backend, device, block_size
        self.sizes = capture_sizes(max_batch)
        self.max_blocks = math.ceil(max_model_len / block_size)
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, object, torch.Tensor]] = {}

    def padded_size(self, query_lens: np.ndarray) -> int | None:
        """The captured size a batch runs at, or None when it must run eagerly (not all decode, or too large)."""
        if len(query_lens) > self.sizes[-1] or int(query_lens.max()) != 1:
            return None
        return next(s for s in self.sizes if s >= len(query_lens))

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
        pool = None
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
            metadata = self.backend.build_graph_metadata(self.dummy_layout(size), self.max_blocks)
            self.model(self.input_ids[:size], self.positions[:size], metadata)  # warm-up (and kernel compiles)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.model(self.input_ids[:size], self.positions[:size], metadata)
            pool = graph.pool()
            self.graphs[size] = (graph, metadata, hidden)
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def run(self, layout: BatchLayout, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The hidden states of a padded decode batch (layout, ids and positions already padded to a size)."""
        size = len(layout.query_lens)
        graph, metadata, hidden = self.graphs[size]
        self.input_ids[:size].copy_(input_ids, non_blocking=True)
        self.positions[:size].copy_(positions, non_blocking=True)
        self.backend.build_graph_metadata(layout, self.max_blocks, out=metadata)
        graph.replay()
        return hidden
