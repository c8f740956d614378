"""Builds one flat batch of all scheduled tokens, runs the model over the paged cache and samples."""
import logging
from dataclasses import dataclass

import numpy as np
import torch

from llmserve.config import EngineConfig, resolve_dtype
from llmserve.interfaces import BatchLayout, Platform
from llmserve.loader import iter_weights
from llmserve.plugins.select import model_class, select_attention_backend
from llmserve.request import Request
from llmserve.sampler import SamplerOutput, sample
from llmserve.scheduler import ScheduledBatch

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    sampled: list[Request]  # requests that caught up with their tokens and got a new one
    sampler_output: SamplerOutput | None
    prompt_logprobs: dict[int, tuple[torch.Tensor, np.ndarray]]  # batch row -> (logprobs [n, V], target ids)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: str, hf_config, platform: type[Platform]) -> None:
        self.config, self.platform = config, platform
        self.device = torch.device(config.device) if config.device else platform.device()
        model_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        model_dtype = getattr(torch, model_dtype) if isinstance(model_dtype, str) else model_dtype
        self.dtype = resolve_dtype(config.dtype, model_dtype, platform.default_dtype())
        self.model = self.build_model(model_class(hf_config), hf_config)
        self.spec = self.model.attention_spec(config.block_size)
        self.backend = select_attention_backend(config.attention_backend, self.spec, platform)(self.spec, self.device)
        if config.load_format == "dummy":
            self.init_dummy_weights()
        else:
            self.model.load_weights(iter_weights(model_path))
        platform.prepare_model(self.model)
        self.num_blocks = self.allocate_kv_cache()

    def build_model(self, cls, hf_config) -> torch.nn.Module:
        default = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                return cls(hf_config, self.dtype).eval()
        finally:
            torch.set_default_dtype(default)

    def init_dummy_weights(self) -> None:
        generator = torch.Generator(self.device).manual_seed(self.config.seed)
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if "norm" in name:
                    param.fill_(1.0)
                else:
                    param.uniform_(-0.05, 0.05, generator=generator)

    def layers(self) -> list:
        from llmserve.models.layers import Attention

        return [m for m in self.model.modules() if isinstance(m, Attention)]

    def allocate_kv_cache(self) -> int:
        layers = self.layers()
        s = self.spec
        bytes_per_block = 2 * s.block_size * s.num_kv_heads * s.head_dim * self.dtype.itemsize * len(layers)
        num_blocks = self.platform.kv_cache_bytes(self.config) // bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"no memory left for the KV cache: one block of {s.block_size} tokens needs "
                             f"{bytes_per_block} bytes; raise kv_cache_memory_bytes (or gpu_memory_utilization)")
        for layer in layers:
            layer.backend = self.backend
            layer.kv_cache = self.platform.zeroed_kv_cache(self.backend.kv_cache_shape(num_blocks), self.dtype, self.device)
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, s.block_size,
                    num_blocks * bytes_per_block / 2**30)
        return num_blocks

    def prepare(self, batch: ScheduledBatch) -> tuple[BatchLayout, torch.Tensor, torch.Tensor]:
        bs = self.config.block_size
        query_lens = np.array(batch.num_new_tokens, dtype=np.int64)
        num_computed = np.array([r.num_computed_tokens for r in batch.requests], dtype=np.int64)
        positions = np.concatenate([np.arange(c, c + n) for c, n in zip(num_computed, query_lens)])
        input_ids = np.concatenate([r.token_ids[c:c + n] for r, c, n in zip(batch.requests, num_computed, query_lens)])
        owner = np.repeat(np.arange(len(query_lens)), query_lens)
        tables = [r.block_ids for r in batch.requests]
        width = max(len(t) for t in tables)
        padded = np.array([t + [0] * (width - len(t)) for t in tables], dtype=np.int64)
        slots = padded[owner, positions // bs] * bs + positions % bs
        to = lambda a: torch.from_numpy(a).to(self.device, non_blocking=True)
        layout = BatchLayout(query_lens, num_computed, tables, to(slots), bs, self.device)
        return layout, to(input_ids.astype(np.int64)), to(positions)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        layout, input_ids, positions = self.prepare(batch)
        hidden = self.model(input_ids, positions, self.backend.build_metadata(layout))
        ends = layout.query_start_loc[1:] - 1
        rows = [i for i, r in enumerate(batch.requests) if r.num_computed_tokens + batch.num_new_tokens[i] == r.num_tokens]
        sampled = [batch.requests[i] for i in rows]
        output = sample(self.model.compute_logits(hidden[ends[rows]]), sampled) if rows else None
        return StepResult(sampled, output, self.prompt_logprobs(batch, layout, hidden))

    def prompt_logprobs(self, batch: ScheduledBatch, layout: BatchLayout, hidden: torch.Tensor) -> dict:
        """Logprobs of each prompt token given the ones before it, for requests that ask for them."""
        result = {}
        for i, r in enumerate(batch.requests):
            if r.params.prompt_logprobs is None or r.num_computed_tokens >= r.num_prompt_tokens:
                continue
            start, computed = int(layout.query_start_loc[i]), r.num_computed_tokens
            count = min(batch.num_new_tokens[i], r.num_prompt_tokens - 1 - computed)  # last prompt token predicts output
            if count > 0:
                logits = self.model.compute_logits(hidden[start:start + count]).float()
                result[i] = (torch.log_softmax(logits, dim=-1), np.array(r.token_ids[computed + 1:computed + 1 + count]))
        return result
