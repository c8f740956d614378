"""LLMEngine: requests in, one scheduled and executed batch per step, outputs out."""
import dataclasses
import gc
import itertools
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llmserve import distributed
from llmserve.config import EngineConfig
from llmserve.errors import ParamError
from llmserve.executor import start_workers
from llmserve.kv_cache import KVCacheManager
from llmserve.loader import find_model, load_engine_tokenizer, load_generation_defaults, load_hf_config
from llmserve.model_runner import Launched, ModelRunner, StepResult
from llmserve.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from llmserve.plugins.select import current_platform
from llmserve.request import Request
from llmserve.sampling_params import SamplingParams
from llmserve.scheduler import ScheduledBatch, Scheduler
from llmserve.structured_outputs import GrammarCompiler, accept_grammar_token, new_matcher
from llmserve.tokenizer import IncrementalDetokenizer, append_text_and_check_stop, load_chat_template, tokenize

if TYPE_CHECKING:
    import xgrammar

logger = logging.getLogger(__name__)


@dataclass
class RequestGroup:
    """What the user asked for: one prompt, n completions."""

    request_id: str
    prompt: str | None
    children: list[Request]

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.children)


def resolve_max_model_len(config: EngineConfig, hf_config, num_blocks: int) -> int:
    """max_model_len as asked (checked against the model's limit and the KV cache), else the most both allow."""
    model_limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    requested = config.max_model_len
    if requested and requested > model_limit:
        raise ValueError(f"max_model_len {requested} is larger than the model's limit {model_limit}")
    length = requested or model_limit
    capacity = num_blocks * config.block_size
    if capacity < length:
        if requested:
            raise ValueError(f"the KV cache holds {capacity} tokens, fewer than max_model_len {length}; "
                             "raise kv_cache_memory_bytes or lower max_model_len")
        logger.warning("max_model_len lowered from %d to %d, what the KV cache holds", length, capacity)
        length = capacity
    return length


def freeze_startup_heap() -> None:
    """Move what start-up made (modules, the model's Python objects, a tokenizer: some 300,000 objects) out of the
    garbage collector's sight: a full collection walks every object it tracks, and over that heap one took 180 ms,
    a stall of every running request."""
    gc.collect()
    gc.freeze()


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.platform = current_platform(config.device)
        if config.max_num_batched_tokens is None:
            config = dataclasses.replace(config, max_num_batched_tokens=self.platform.max_num_batched_tokens)
        self.config = config
        self.model_path = find_model(config.model)
        self.hf_config = load_hf_config(self.model_path)
        self.tokenizer = load_engine_tokenizer(config, self.model_path)
        self.chat_template = load_chat_template(config.chat_template)
        self.sampling_defaults = load_generation_defaults(self.model_path, config.generation_config)
        if distributed.tp().world_size > 1:  # the layers read this process's one parallel state
            raise ValueError("a tensor-parallel engine is running in this process; shut it down first "
                             "(llm.engine.shutdown())")
        workers = (start_workers(config, self.model_path, self.hf_config, self.platform)
                   if config.tensor_parallel_size * config.pipeline_parallel_size > 1 else None)
        self.runner = ModelRunner(config, self.model_path, self.hf_config, self.platform)
        self.runner.workers = workers
        self.max_model_len = resolve_max_model_len(config, self.hf_config, self.runner.num_blocks)
        self.runner.prepare_decode(self.max_model_len)
        self.kv = KVCacheManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.kv, self.max_model_len)
        self.groups: dict[str, RequestGroup] = {}
        self.eos_token_ids = self.find_eos_token_ids()
        self.vocab_size = self.hf_config.vocab_size
        self.grammar_compiler = (GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
                                 if self.tokenizer is not None else None)
        self.ids = itertools.count()
        # launched steps not yet read: an async continuation, or one microbatch per pipeline stage
        self.inflight: deque[Launched] = deque()
        self.pipeline_depth = config.pipeline_parallel_size
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.platform.async_scheduling) and self.pipeline_depth == 1
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "max_batch_size": 0, "steps": 0, "async_steps": 0,
                      "max_microbatches_in_flight": 0}
        freeze_startup_heap()
        logger.info("engine ready: %s on %s, backend %s, dtype %s, max_model_len %d", self.model_path,
                    self.platform.name, self.runner.backend.name, self.runner.dtype, self.max_model_len)

    def find_eos_token_ids(self) -> frozenset[int]:
        ids = getattr(self.hf_config, "eos_token_id", None)
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    def default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.sampling_defaults)

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return tokenize(self.tokenizer, prompt)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None) -> None:
        if request_id is not None and request_id in self.groups:
            raise ParamError("request_id", f"request_id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ParamError("prompt", "prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ParamError("prompt", f"prompt has {len(prompt_token_ids)} tokens; the model's context "
                                       f"(max_model_len) is {self.max_model_len}, which leaves no room for an "
                                       "output token")
        bad = [t for t in prompt_token_ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise ParamError("prompt", f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        if params.stop_strings and self.tokenizer is None:
            raise ParamError("stop", "stop strings need a tokenizer; the engine runs without one (skip_tokenizer_init)")
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(params, name) or 0) > self.config.max_logprobs:
                raise ParamError(name, f"{name} must be at most {self.config.max_logprobs} (the engine's "
                                       f"max_logprobs), got {getattr(params, name)}")
        self.validate_logit_controls(params)

    def validate_logit_controls(self, params: SamplingParams) -> None:
        """Token ids in the vocabulary; bad words and structured outputs need the tokenizer; a grammar must
        compile."""
        if params.bad_words and self.tokenizer is None:
            raise ParamError("bad_words", "bad_words need a tokenizer; the engine runs without one "
                                          "(skip_tokenizer_init)")
        bad_words_token_ids = [t for word in self.tokenize_bad_words(params.bad_words or []) for t in word]
        for name, ids in (("logit_bias", list(params.logit_bias or {})),
                          ("allowed_token_ids", params.allowed_token_ids or []),
                          ("bad_words", bad_words_token_ids)):
            outside = [t for t in ids if t >= self.vocab_size]
            if outside:
                raise ParamError(name, f"{name} has token ids outside the vocabulary [0, {self.vocab_size}): "
                                 f"{outside[:5]}")
        self.compile_structured_outputs(params)

    def tokenize_bad_words(self, words: list[str]) -> list[list[int]]:
        """Each word's tokens at the start of a text and after a space (as vLLM), each variant once."""
        variants = (self.tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False)
                    for word in words for prefix in ("", " "))
        return list({tuple(ids): ids for ids in variants if ids}.values())

    def compile_structured_outputs(self, params: SamplingParams) -> "xgrammar.CompiledGrammar | None":
        """The grammar of `params.structured_outputs` (None when it has none), compiled or found in the cache of
        compiled grammars; a ValueError naming structured_outputs when it does not compile or the engine runs
        without a tokenizer.

        add_request calls it on the engine's thread. A server should call it first, off that thread (it is
        thread-safe, and xgrammar compiles without holding the GIL): add_request then finds the grammar in the
        cache at once, so the engine loop never waits for a compilation (a large JSON schema may take many
        milliseconds; the first grammar also reads the tokenizer's vocabulary, about 0.2 s), and a bad grammar
        is refused before the request reaches the engine."""
        if params.structured_outputs is None:
            return None
        if self.grammar_compiler is None:
            raise ParamError("structured_outputs", "structured_outputs need a tokenizer; the engine runs without one "
                             "(skip_tokenizer_init)")
        return self.grammar_compiler.compile(params.structured_outputs)

    def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams,
                    token_ids: list[int] | None = None) -> str:
        """Queue a request (after validating it: nothing is queued when it raises) and return its id.

        `token_ids` may carry the already tokenized `prompt`."""
        request_id = str(next(self.ids)) if request_id is None else request_id
        token_ids = self.tokenize(prompt) if token_ids is None else token_ids
        self.validate(token_ids, params, request_id)
        limit = self.max_model_len if params.max_tokens is None else min(self.max_model_len, len(token_ids) + params.max_tokens)
        grammar = self.compile_structured_outputs(params)  # from the cache: validate compiled it
        bad_words = self.tokenize_bad_words(params.bad_words or [])
        children = []
        for i in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(self.runner.device).manual_seed(params.seed + i)
            child = Request(f"{request_id}-{i}" if params.n > 1 else request_id, token_ids, params, limit,
                            self.eos_token_ids, generator, group_id=request_id, bad_words_token_ids=bad_words,
                            grammar=new_matcher(grammar) if grammar is not None else None)
            if self.tokenizer is not None:
                child.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
            children.append(child)
        self.groups[request_id] = RequestGroup(request_id, prompt if isinstance(prompt, str) else None, children)
        for child in children:
            self.scheduler.add(child)
        return request_id

    def abort(self, request_id: str) -> None:
        group = self.groups.pop(request_id, None)
        for child in group.children if group else []:
            if not child.finished:
                child.finish_reason = "abort"
                self.scheduler.finish(child)

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do at one rank); the engine cannot step afterwards."""
        if self.runner.workers is not None:
            self.runner.workers.stop()

    def check_health(self) -> None:
        """Raise WorkerDied when a tensor-parallel rank has exited (vLLM's name)."""
        if self.runner.workers is not None:
            self.runner.workers.check_alive()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or bool(self.inflight)

    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one batch; return the outputs of every request that advanced, or only of those that finished
        (which are then forgotten)."""
        try:
            current = self.next_step()
            if current is None:
                return []
            result = self.runner.finish(current)
        except BaseException:
            self.inflight.clear()
            raise
        for i, request in enumerate(current.batch.requests):
            if i in result.prompt_logprobs:
                self.record_prompt_logprobs(request, *result.prompt_logprobs[i])
        self.process_samples(result)
        touched = dict.fromkeys(r.group_id for r in current.batch.requests)
        outputs = []
        for request_id in touched:
            group = self.groups.get(request_id)
            if group is None or (finished_only and not group.finished):
                continue
            outputs.append(self.make_output(group))
            if group.finished:
                del self.groups[request_id]
        return outputs

    def next_step(self) -> Launched | None:
        """The launched step to read now. With pipeline stages, first launch microbatches of requests not already in
        flight until every stage has one (stage s runs them in order, so a chunk or a cached block written by an
        earlier one is there for a later one); with async scheduling, launch the continuation of the step read."""
        if self.pipeline_depth > 1:
            while len(self.inflight) < self.pipeline_depth:
                # preempting a request in flight would free blocks its stages still write
                requests = len(self.scheduler.running) + len(self.scheduler.waiting)
                share = max(1, -(-requests // self.pipeline_depth))  # each microbatch its part of the requests
                launched = self.launch(self.scheduler.schedule(can_preempt=not self.inflight, max_requests=share))
                if launched is None:
                    break
                self.inflight.append(launched)
            self.stats["max_microbatches_in_flight"] = max(self.stats["max_microbatches_in_flight"], len(self.inflight))
            return self.inflight.popleft() if self.inflight else None
        current = self.inflight.popleft() if self.inflight else self.launch(self.scheduler.schedule())
        if current is not None and self.async_scheduling:
            continuation = self.launch_continuation(current)
            if continuation is not None:
                self.inflight.append(continuation)
        return current

    def launch(self, batch: ScheduledBatch, input_ids: tuple | None = None) -> Launched | None:
        """Queue the batch's GPU work and count its tokens as computed (their samples are read later)."""
        if not batch.requests:
            return None
        launched = self.runner.launch(batch, input_ids)
        self.stats["steps"] += 1
        self.stats["async_steps"] += batch.continuation
        self.stats["max_batch_size"] = max(self.stats["max_batch_size"], len(batch.requests))
        for request, count in zip(batch.requests, batch.num_new_tokens):
            self.stats["prompt_tokens"] += max(0, min(count, request.num_prompt_tokens - request.num_computed_tokens))
            request.num_computed_tokens += count
            self.kv.cache_computed_blocks(request)
        return launched

    def launch_continuation(self, current: Launched) -> Launched | None:
        """While `current` (a decode step) runs, launch the next decode step of its requests, fed with its
        sampled tokens on the device. Requests that `current` finishes by length are left out; one that it
        finishes otherwise (EOS, a stop) computes one token that is dropped when it arrives."""
        batch = current.batch
        if (self.scheduler.waiting or max(batch.num_new_tokens) != 1
                or len(current.sampled) != len(batch.requests)):
            return None  # new requests get scheduled
        if any(r.samples_from_its_tokens for r in batch.requests):
            return None  # penalties, min_tokens, bad words and grammars need the token still in flight
        rows = [i for i, r in enumerate(batch.requests) if not r.finished and r.num_tokens + 1 < r.max_len]
        if not rows or not all(self.kv.allocate(batch.requests[i], 1) for i in rows):
            return None
        continuation = ScheduledBatch([batch.requests[i] for i in rows], [1] * len(rows), continuation=True)
        tokens = current.sampler_output.token_ids
        return self.launch(continuation, (tokens, rows if len(rows) < len(batch.requests) else None))

    def process_samples(self, result: StepResult) -> None:
        if not result.sampled:
            return
        out = result.sampler_output
        for row, request in enumerate(result.sampled):
            if request.finished:
                continue  # finished (or aborted) after this step was launched: its token is dropped
            token = out.token_ids_host[row]
            request.token_ids.append(token)
            self.stats["generation_tokens"] += 1
            request.cumulative_logprob += out.logprobs[row]
            if request.logprobs is not None:
                request.logprobs.append(self.position_logprobs(token, out.logprobs[row], out.sampled_ranks[row],
                                                               out.top_ids[row], out.top_logprobs[row],
                                                               request.params.logprobs))
            self.check_finished(request, token)
            if request.finish_reason:
                self.scheduler.finish(request)

    def check_finished(self, request: Request, token: int) -> None:
        params = request.params
        may_stop = request.num_output_tokens >= params.min_tokens
        grammar_ended = request.grammar is not None and accept_grammar_token(request.grammar, token)
        if grammar_ended or (may_stop and not params.ignore_eos and token in request.eos_token_ids):
            request.finish_reason = "stop"  # a complete grammar allows nothing more, ignore_eos or not
        elif may_stop and token in params.stop_token_ids:
            request.finish_reason, request.stop_reason = "stop", token
        if request.detokenizer is not None and (request.finish_reason is None or not params.skip_special_tokens):
            append_text_and_check_stop(request, request.detokenizer.add(token), check_stops=may_stop)
        if request.finish_reason is None and request.num_tokens >= request.max_len:
            request.finish_reason = "length"

    def position_logprobs(self, token: int, logprob: float, rank: int, top_ids: torch.Tensor,
                          top_logprobs: torch.Tensor, k: int) -> PositionLogprobs:
        decode = self.tokenizer.decode if self.tokenizer is not None else lambda ids: None
        entries = {token: Logprob(logprob, rank, decode([token]))}
        for tid, lp, r in zip(top_ids[:k].tolist(), top_logprobs[:k].tolist(), range(1, k + 1)):
            entries.setdefault(tid, Logprob(lp, r, decode([tid])))
        return entries

    def record_prompt_logprobs(self, request: Request, logprobs: torch.Tensor, targets) -> None:
        if request.prompt_logprobs is None:
            request.prompt_logprobs = [None]
        k = request.params.prompt_logprobs
        chosen = logprobs.gather(1, torch.as_tensor(targets, device=logprobs.device)[:, None]).squeeze(1)
        ranks = (logprobs > chosen[:, None]).sum(-1) + 1
        top_lp, top_ids = logprobs.topk(max(k, 1), dim=-1)
        for j, token in enumerate(targets.tolist()):
            request.prompt_logprobs.append(self.position_logprobs(token, chosen[j].item(), int(ranks[j]),
                                                                  top_ids[j], top_lp[j], k))

    def make_output(self, group: RequestGroup) -> RequestOutput:
        first = group.children[0]
        completions = [CompletionOutput(i, c.text, c.output_token_ids,
                                        c.cumulative_logprob if c.params.logprobs is not None else None,
                                        c.logprobs, c.finish_reason, c.stop_reason)
                       for i, c in enumerate(group.children)]
        return RequestOutput(group.request_id, group.prompt, first.prompt_token_ids, first.prompt_logprobs,
                             completions, group.finished, first.num_cached_tokens)
