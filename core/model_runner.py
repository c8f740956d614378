"""Builds one flat batch of all scheduled tokens, runs the model over the paged cache and samples."""
import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from llmserve.config import KV_CACHE_DTYPES, EngineConfig, resolve_dtype
from llmserve.distributed import broadcast_from_first_rank, min_over_ranks, tp
from llmserve.interfaces import BatchLayout, Platform
from llmserve import quantization
from llmserve.loader import iter_weights
from llmserve.plugins.select import model_class, select_attention_backend
from llmserve.request import Request
from llmserve.sampler import SamplerOutput, sample
from llmserve.scheduler import ScheduledBatch

logger = logging.getLogger(__name__)
LOGITS_TAG = 3  # the last pipeline stage's logits to rank 0 (tags keep the point-to-point streams apart on gloo)


@dataclass
class Launched:
    """A step whose GPU work is queued; its sampled tokens are read by ModelRunner.finish."""

    batch: ScheduledBatch
    sampled: list[Request]
    sampler_output: SamplerOutput | None
    prompt_logprobs: dict
    plan: "StepPlan | None" = None
    logits: "StepLogits | None" = None  # until sampled


@dataclass
class StepPlan:
    """One step's model inputs on the host (no Request objects): what rank 0 sends the other tensor-parallel ranks."""

    query_lens: np.ndarray  # [B] int64, padding rows included
    num_computed: np.ndarray  # [B] int64
    block_tables: list[list[int]]
    input_ids: np.ndarray  # [T] int64 (zeros for a continuation: the device copy fills them)
    positions: np.ndarray  # [T] int64
    slots: np.ndarray  # [T] int64, -1 for padding
    graph_size: int | None  # the captured decode CUDA graph it runs in (None: not one)
    piece_tokens: int | None  # the token count of the CUDA graph pieces it runs in (None: not those)
    continuation: bool  # the ids of its sampled rows are the previous step's samples, still on rank 0's device
    sample_rows: list[int]  # batch rows that sample a token
    prompt_spans: list[tuple[int, int, int]]  # (batch row, first flat token, count) of prompt logprobs asked for


@dataclass
class StepLogits:
    logits: torch.Tensor | None  # [len(sample_rows), V]
    prompt_logits: dict[int, torch.Tensor]  # batch row -> [count, V]
    arriving: tuple | None = None  # on rank 0 with pipeline stages: (the receive in flight, its buffer, row counts)

    def wait(self, plan: "StepPlan") -> "StepLogits":
        """The logits once the last stage's send has arrived (at once when they were computed here)."""
        if self.arriving is None:
            return self
        work, joined, counts = self.arriving
        work.wait()
        parts = joined.split(counts)
        return StepLogits(parts[0] if plan.sample_rows else None,
                          {i: part for (i, _, _), part in zip(plan.prompt_spans, parts[1:])})


@dataclass
class StepResult:
    sampled: list[Request]  # requests that caught up with their tokens and got a new one
    sampler_output: SamplerOutput | None
    prompt_logprobs: dict[int, tuple[torch.Tensor, np.ndarray]]  # batch row -> (logprobs [n, V], target ids)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: str, hf_config, platform: type[Platform],
                 device: torch.device | None = None) -> None:
        self.config, self.platform = config, platform
        self.max_positions = getattr(hf_config, "max_position_embeddings", None)
        self.hf_vocab_size = hf_config.vocab_size
        self.device = device or (torch.device(config.device) if config.device else platform.device())
        model_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        model_dtype = getattr(torch, model_dtype) if isinstance(model_dtype, str) else model_dtype
        self.dtype = resolve_dtype(config.dtype, model_dtype, platform.default_dtype())
        self.quant = quantization.choose(config.quantization, hf_config, self.dtype, platform.name)
        try:
            self.model = self.build_model(model_class(hf_config), hf_config)
            if self.quant is not None:
                quantization.prepare(self.model, self.quant)
            if config.load_format == "dummy":
                self.init_dummy_weights()
            else:
                weights = iter_weights(model_path, config.load_format)
                self.model.load_weights(self.quant.checkpoint_tensors(weights) if self.quant else weights)
            if self.quant is not None:
                quantization.finish(self.model, self.quant, config.load_format == "dummy",
                                    torch.Generator(self.device).manual_seed(config.seed))
        except torch.OutOfMemoryError:
            raise ValueError(self.weights_do_not_fit(model_class(hf_config), hf_config)) from None
        self.spec = dataclasses.replace(self.model.attention_spec(config.block_size),
                                        kv_cache_dtype=KV_CACHE_DTYPES[config.kv_cache_dtype])
        self.backend = select_attention_backend(config.attention_backend, self.spec, platform)(self.spec, self.device)
        platform.prepare_model(self.model)
        self.uploads = platform.host_uploads(self.device)
        self.graphs = None
        self.workers = None  # the other tensor-parallel ranks, on rank 0 (executor.Workers)
        self.num_blocks = self.allocate_kv_cache()
        # fp8 cache scales that the checkpoint did not give: computed in the first step (Attention's docstring)
        self.kv_scales_to_compute = ([layer for layer in self.layers() if not layer.kv_scales_known]
                                     if self.spec.kv_cache_dtype is not None else [])

    def build_model(self, cls, hf_config) -> torch.nn.Module:
        default = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                return cls(hf_config, self.dtype).eval()
        finally:
            torch.set_default_dtype(default)

    def weights_do_not_fit(self, cls, hf_config) -> str:
        with torch.device("meta"):
            needed = sum(p.numel() for p in cls(hf_config, self.dtype).parameters()) * self.dtype.itemsize
        room = ""
        if (memory := self.platform.memory_info(self.device)) is not None:
            room = f" ({memory[1] / 2**30:.1f} GiB, {memory[0] / 2**30:.1f} GiB free before loading)"
        return (f"the model's weights need {needed / 2**30:.1f} GiB in {str(self.dtype).removeprefix('torch.')}, "
                f"more than the {self.device} has room for{room}; use a device with more memory, more "
                "tensor-parallel ranks, a smaller model or a smaller dtype")

    @torch.inference_mode()
    def profile_step(self) -> None:
        """One forward pass of max_num_batched_tokens tokens (and logits for max_num_seqs rows), so that the
        peak memory it leaves in torch's statistics tells the platform what the KV cache may take."""
        tokens, bs = self.config.max_num_batched_tokens, self.config.block_size
        # requests no longer than the model allows: positions past its tables would read out of bounds
        longest = min(tokens, self.config.max_model_len or self.max_positions or tokens)
        lengths = np.array([longest] * (tokens // longest) + ([tokens % longest] if tokens % longest else []))
        blocks = -(-lengths // bs)
        num_blocks = int(blocks.sum())
        layers = self.layers()
        for layer in layers:
            layer.backend = self.backend
            layer.kv_cache = torch.zeros(self.backend.kv_cache_shape(num_blocks), dtype=self.spec.cache_dtype,
                                         device=self.device)
        starts = np.concatenate([[0], np.cumsum(blocks)])
        tables = [list(range(starts[i], starts[i + 1])) for i in range(len(lengths))]
        positions = torch.from_numpy(np.concatenate([np.arange(n) for n in lengths])).to(self.device)
        slots = torch.from_numpy(np.concatenate([np.asarray(t)[np.arange(n) // bs] * bs + np.arange(n) % bs
                                                 for t, n in zip(tables, lengths)])).to(self.device)
        layout = BatchLayout(lengths, np.zeros_like(lengths), tables, slots, bs, self.device)
        hidden = self.model(torch.zeros(tokens, dtype=torch.int64, device=self.device), positions,
                            self.backend.build_metadata(layout))
        rows = min(self.config.max_num_seqs, tokens)
        if hidden is not None:  # not a pipeline stage before the last
            self.model.compute_logits(hidden[:rows]).float().log_softmax(-1).sort(dim=-1)
        for layer in layers:
            layer.kv_cache = torch.empty(0)

    def init_dummy_weights(self) -> None:
        generator = torch.Generator(self.device).manual_seed(self.config.seed)
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if not param.dtype.is_floating_point or param.dtype.itemsize == 1:
                    continue  # a quantization method's packed or fp8 values: its dummy_weights fills them
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
        bytes_per_block = 2 * s.block_size * s.num_kv_heads * s.head_dim * s.cache_dtype.itemsize * len(layers)
        cache_bytes = self.platform.kv_cache_bytes(self.config, self.profile_step)
        num_blocks = min_over_ranks(cache_bytes // bytes_per_block)  # one block table for all ranks
        if num_blocks < 1:
            raise ValueError(f"no memory left for the KV cache: one block of {s.block_size} tokens needs "
                             f"{bytes_per_block} bytes; raise kv_cache_memory_bytes or gpu_memory_utilization, "
                             "or lower max_num_batched_tokens (the activation memory reserved for one step)")
        try:
            for layer in layers:
                layer.backend = self.backend
                layer.kv_cache = self.platform.zeroed_kv_cache(self.backend.kv_cache_shape(num_blocks),
                                                               s.cache_dtype, self.device)
        except torch.OutOfMemoryError:
            raise ValueError(f"a KV cache of {num_blocks * bytes_per_block / 2**30:.1f} GiB does not fit in the GPU's "
                             f"free memory; lower kv_cache_memory_bytes or gpu_memory_utilization") from None
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB, %s)", num_blocks, s.block_size,
                    num_blocks * bytes_per_block / 2**30, str(s.cache_dtype).removeprefix("torch."))
        return num_blocks

    def prepare_decode(self, max_model_len: int) -> None:
        """Capture the decode CUDA graphs, or with enforce_eager run each decode shape once: either way the kernels
        compile now, not during the first steps."""
        if tp().stages > 1:
            return  # pipeline stages run eagerly: a graph would hold their sends and receives
        graphs = self.platform.decode_graphs(self.model, self.backend, self.config.max_num_seqs, max_model_len,
                                             self.config.block_size, self.device,
                                             min(self.config.max_graph_prefill_tokens,
                                                 self.config.max_num_batched_tokens))
        if graphs is None:
            return
        if self.config.enforce_eager:
            graphs.run_each_size()
        else:
            graphs.capture()
            self.graphs = graphs
            if self.workers is not None:
                self.workers.graphs.append(graphs)

    def plan(self, batch: ScheduledBatch) -> StepPlan:
        """The step's flat batch on the host, padded up to a captured CUDA graph's size: a decode step with rows of one
        token, a step with prompt tokens with one request of the missing tokens (graph pieces)."""
        bs = self.config.block_size
        # the step that computes the KV-cache scales runs attention eagerly: in graph pieces, not a whole graph
        whole_graph = self.graphs is not None and not self.kv_scales_to_compute
        pad_to = self.graphs.padded_size(np.array(batch.num_new_tokens)) if whole_graph else None
        pieces = (self.graphs.padded_tokens(sum(batch.num_new_tokens)) if self.graphs and pad_to is None
                  else None)
        query_lens = np.array(batch.num_new_tokens, dtype=np.int64)
        num_computed = np.array([r.num_computed_tokens for r in batch.requests], dtype=np.int64)
        tables = [r.block_ids for r in batch.requests]
        positions = np.concatenate([np.arange(c, c + n) for c, n in zip(num_computed, query_lens)])
        if batch.continuation:  # the tokens are still on the device: the caller copies them in
            input_ids = np.zeros(len(tables), dtype=np.int64)
        else:
            input_ids = np.concatenate([r.token_ids[c:c + n]
                                        for r, c, n in zip(batch.requests, num_computed, query_lens)])
        if len(positions) == len(tables):  # all decode: one slot each, no arrays per request
            slots = np.array([t[p // bs] * bs + p % bs for t, p in zip(tables, positions.tolist())], dtype=np.int64)
        else:
            slots = np.concatenate([np.asarray(t)[p // bs] * bs + p % bs for t, p in
                                    zip(tables, np.split(positions, np.cumsum(query_lens)[:-1]))])
        sample_rows = [i for i, r in enumerate(batch.requests)
                       if batch.continuation or r.num_computed_tokens + batch.num_new_tokens[i] == r.num_tokens]
        starts = np.concatenate([[0], np.cumsum(query_lens)])
        prompt_spans = []  # logprobs of each prompt token given the ones before it, for requests that ask
        for i, r in enumerate(batch.requests):
            if r.params.prompt_logprobs is None or r.num_computed_tokens >= r.num_prompt_tokens:
                continue
            count = min(batch.num_new_tokens[i], r.num_prompt_tokens - 1 - r.num_computed_tokens)  # the last one
            if count > 0:  # predicts the first output token
                prompt_spans.append((i, int(starts[i]), count))
        padding: list[tuple[int, list[int]]] = []  # (tokens, block table) of each padding request
        if pad_to is not None and pad_to > len(tables):  # decode rows of one token, no blocks
            padding = [(1, [])] * (pad_to - len(tables))
        elif pieces is not None and pieces > len(positions):  # one request of the missing tokens, reading block 0
            extra = pieces - len(positions)
            padding = [(extra, [0] * -(-extra // bs))]
        if padding:
            extra = sum(n for n, _ in padding)
            query_lens = np.concatenate([query_lens, np.array([n for n, _ in padding], dtype=np.int64)])
            num_computed = np.concatenate([num_computed, np.zeros(len(padding), dtype=np.int64)])
            tables = tables + [table for _, table in padding]
            input_ids, positions = np.pad(input_ids, (0, extra)), np.pad(positions, (0, extra))
            slots = np.pad(slots, (0, extra), constant_values=-1)
        return StepPlan(query_lens, num_computed, tables, input_ids.astype(np.int64), positions, slots, pad_to,
                        pieces, batch.continuation, sample_rows, prompt_spans)

    @torch.inference_mode()
    def execute(self, plan: StepPlan, input_ids: tuple[torch.Tensor, list[int] | None] | None = None) -> StepLogits:
        """The model over a planned step, and the logits of the rows it samples and of the prompt tokens asked for:
        what every tensor-parallel rank runs, in the same order (its collectives must meet)."""
        if self.uploads is not None:  # on rank 0, waiting in a way that notices a rank that died
            self.uploads.next_step(self.workers.wait_for if self.workers is not None else None)
        layout = BatchLayout(plan.query_lens, plan.num_computed, plan.block_tables, None, self.config.block_size,
                             self.device, self.uploads)
        tokens = len(plan.input_ids)
        device = layout.to_device(np.concatenate([plan.input_ids, plan.positions, plan.slots]))
        layout.slot_mapping = device[2 * tokens:]
        ids, positions = device[:tokens], device[tokens:2 * tokens]
        if plan.continuation:  # the previous step's sampled tokens, still on rank 0's device
            continued = ids[:len(plan.sample_rows)]
            if input_ids is not None:
                previous, rows = input_ids
                continued.copy_(previous if rows is None else previous[layout.to_device(np.array(rows))])
            broadcast_from_first_rank(continued)  # the other tensor-parallel ranks' copy, queued on the device
        for layer in self.kv_scales_to_compute:  # the first step: real tokens first, then any padding
            layer.compute_kv_scales_rows = int((plan.slots >= 0).sum())
        try:
            if plan.graph_size is not None:
                hidden = self.graphs.run(layout, ids, positions)
            elif plan.piece_tokens is not None:
                hidden = self.graphs.run_pieces(layout, ids, positions)
            else:
                hidden = self.model(ids, positions, self.backend.build_metadata(layout))
        finally:
            for layer in self.kv_scales_to_compute:
                layer.compute_kv_scales_rows = None
        self.kv_scales_to_compute = [layer for layer in self.kv_scales_to_compute if not layer.kv_scales_known]
        logits, prompt = None, {}
        if hidden is not None:  # the last pipeline stage (or the only one)
            if plan.sample_rows:
                rows = plan.sample_rows
                one_each = len(rows) == len(plan.block_tables) and int(plan.query_lens.max()) == 1
                ends = layout.query_start_loc[1:] - 1  # a decode batch's last tokens are its first rows
                last = hidden[:len(rows)] if one_each or plan.graph_size else hidden[layout.to_device(ends[rows])]
                logits = self.model.compute_logits(last)
            prompt = {i: self.model.compute_logits(hidden[start:start + count])
                      for i, start, count in plan.prompt_spans}
        if tp().stages > 1:
            return self.logits_to_rank_zero(plan, logits, prompt)
        return StepLogits(logits, prompt)

    def logits_to_rank_zero(self, plan: StepPlan, logits, prompt: dict) -> StepLogits:
        """With pipeline stages the last one has the logits and rank 0 (on the first) samples: one send, rows in plan
        order (sampled rows, then each prompt span); rank 0 only posts the receive, so that it can go on to the next
        microbatch while the later stages work."""
        counts = [len(plan.sample_rows)] + [count for _, _, count in plan.prompt_spans]
        state = tp()
        if state.last_stage and state.rank == 0 and sum(counts):
            dist.send(torch.cat(([logits] if logits is not None else []) + list(prompt.values())), 0, tag=LOGITS_TAG)
        if state.global_rank != 0 or not sum(counts):
            return StepLogits(None, {})
        joined = torch.empty((sum(counts), self.hf_vocab_size), dtype=self.dtype, device=self.device)
        return StepLogits(None, {}, (dist.irecv(joined, (state.stages - 1) * state.size, tag=LOGITS_TAG), joined,
                                     counts))

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, input_ids: tuple[torch.Tensor, list[int] | None] | None = None) -> Launched:
        """Queue the step's GPU work (inputs, model, sampling) without waiting for it. `input_ids`: for a
        continuation, the previous step's sampled tokens on the device, and which of its rows to take (None: all).
        With tensor parallelism the plan goes to the other ranks first (executor.py), which run it alike."""
        plan = self.plan(batch)
        if self.workers is not None:
            self.workers.send(plan)
        launched = Launched(batch, [batch.requests[i] for i in plan.sample_rows], None, {}, plan,
                            self.execute(plan, input_ids))
        if launched.logits.arriving is None:  # sample now, so that it queues behind the model on the device
            self.sample(launched)
        return launched

    @torch.inference_mode()
    def sample(self, launched: Launched) -> None:
        step, batch, plan = launched.logits.wait(launched.plan), launched.batch, launched.plan
        launched.logits = None
        launched.sampler_output = sample(step.logits, launched.sampled) if launched.sampled else None
        for i, logits in step.prompt_logits.items():  # each position's logprobs and the prompt token that follows
            first = int(plan.num_computed[i]) + 1  # as planned: the engine has counted the step's tokens since
            targets = np.array(batch.requests[i].token_ids[first:first + logits.shape[0]])
            launched.prompt_logprobs[i] = (torch.log_softmax(logits.float(), dim=-1), targets)

    def finish(self, launched: Launched) -> StepResult:
        """Wait for a launched step's samples and bring them to the host."""
        if launched.logits is not None:  # a pipelined microbatch: its logits arrive now
            self.sample(launched)
        if self.workers is not None and launched.sampler_output is not None:
            self.workers.wait_for(launched.sampler_output.ready)
        output = launched.sampler_output.to_host() if launched.sampler_output is not None else None
        return StepResult(launched.sampled, output, launched.prompt_logprobs)
