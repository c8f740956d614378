"""AsyncEngine: the LLMEngine stepping in a background thread, with one asyncio stream per request.

The event loop never runs the model: it validates and queues requests, and reads each request's
outputs from its stream. The engine thread takes the queued adds and aborts before every step,
so all requests in flight share each batch.
"""
import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from llmserve.config import EngineConfig
from llmserve.engine import LLMEngine
from llmserve.executor import WorkerDied
from llmserve.outputs import RequestOutput
from llmserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What the server knows of the served model; fixed once the engine is built."""

    model_path: str
    max_model_len: int
    vocab_size: int
    max_logprobs: int
    tokenizer: Any  # the HF tokenizer, None with skip_tokenizer_init
    chat_template: str | None  # given with --chat-template (None: the tokenizer's own)
    sampling_defaults: dict  # from generation_config.json
    platform: str
    attention_backend: str
    dtype: str


@dataclass(frozen=True)
class EngineState:
    """The engine's counters and queues at one moment (for /metrics)."""

    running: int
    waiting: int
    kv_cache_usage: float
    kv_cache_used_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens: int
    generation_tokens: int
    preemptions: int
    steps: int
    max_batch_size: int


@dataclass
class AddRequest:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    token_ids: list[int]


@dataclass
class AbortRequest:
    request_id: str


class EngineFault(RuntimeError):
    """A step of the engine failed; the requests in flight were aborted, the engine goes on."""


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


class RequestStream:
    """The outputs of the requests of one call (one per prompt) as (prompt index, cumulative output).

    A slow reader skips straight to each request's newest output."""

    def __init__(self, engine: "AsyncEngine", request_ids: list[str]) -> None:
        self.engine = engine
        self.index = {request_id: i for i, request_id in enumerate(request_ids)}
        self.pending = set(request_ids)
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, RequestOutput | BaseException]] = asyncio.Queue()

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self.pending:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            newest: dict[str, RequestOutput] = {}
            for request_id, item in items:
                if isinstance(item, BaseException):
                    self.abort()
                    raise item
                newest[request_id] = item
            for request_id, output in newest.items():
                if output.finished:
                    self.pending.discard(request_id)
                yield self.index[request_id], output

    def abort(self) -> None:
        """Stop the requests not yet done; their KV blocks are freed before the next step."""
        for request_id in self.pending:
            self.engine.abort(request_id)
        self.pending.clear()


class AsyncEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        core = self.engine
        self.info = ModelInfo(core.model_path, core.max_model_len, core.vocab_size, config.max_logprobs,
                              core.tokenizer, core.chat_template, core.sampling_defaults, core.platform.name,
                              core.runner.backend.name, str(core.runner.dtype).removeprefix("torch."))
        self.commands: queue.SimpleQueue[AddRequest | AbortRequest] = queue.SimpleQueue()
        self.streams: dict[str, RequestStream] = {}
        self.wakeup = threading.Event()
        self.stopping = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.run, name="llmserve-engine", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return self.engine.tokenize(prompt)

    def compile_structured_outputs(self, params: SamplingParams) -> None:
        """Compile (or find cached) the request's grammar; thread-safe, meant for a worker thread, never the loop."""
        self.engine.compile_structured_outputs(params)

    def state(self) -> EngineState:
        core, scheduler = self.engine, self.engine.scheduler
        stats = core.stats
        return EngineState(len(scheduler.running), len(scheduler.waiting), core.kv.usage, core.kv.num_used_blocks,
                           scheduler.prefix_cache_queries, scheduler.prefix_cache_hits, stats["prompt_tokens"],
                           stats["generation_tokens"], scheduler.num_preemptions, stats["steps"],
                           stats["max_batch_size"])

    def add_requests(self, request_id: str, prompts: list[str | list[int]], params: SamplingParams,
                     prompt_token_ids: list[list[int]]) -> RequestStream:
        """Queue one request per prompt (all validated first: a ValueError queues nothing); return their stream."""
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        for token_ids in prompt_token_ids:
            self.engine.validate(token_ids, params)
        request_ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        stream = RequestStream(self, request_ids)
        for child_id, prompt, token_ids in zip(request_ids, prompts, prompt_token_ids):
            self.streams[child_id] = stream
            self.send(AddRequest(child_id, prompt, params, token_ids))
        return stream

    def abort(self, request_id: str) -> None:
        self.send(AbortRequest(request_id))

    def send(self, command: AddRequest | AbortRequest) -> None:
        self.commands.put(command)
        self.wakeup.set()

    def shutdown(self) -> None:
        self.stopping = True
        self.wakeup.set()
        self.thread.join()
        self.engine.shutdown()

    def run(self) -> None:
        try:
            while not self.stopping:
                self.apply_commands()
                if not self.engine.has_unfinished_requests():
                    self.wakeup.wait(timeout=1.0)  # idle: still notice a dead worker within a second
                    self.wakeup.clear()
                    self.engine.check_health()
                    continue
                try:
                    outputs = self.engine.step()
                except WorkerDied:
                    raise  # the engine cannot go on: it stops, /health turns 503 and the server exits
                except Exception as e:
                    logger.exception("engine step failed; aborting the %d requests in flight", len(self.streams))
                    self.fail_all(EngineFault(f"the engine failed: {type(e).__name__}: {e}"))
                    continue
                self.publish([(output.request_id, output) for output in outputs])
        except BaseException as e:
            logger.exception("the engine thread died")
            self.error = e
        finally:
            self.stopping = True
            self.fail_all(EngineDeadError("the engine has stopped"))

    def apply_commands(self) -> None:
        while not self.commands.empty():
            command = self.commands.get()
            if isinstance(command, AbortRequest):
                self.engine.abort(command.request_id)
                self.streams.pop(command.request_id, None)
                continue
            try:
                self.engine.add_request(command.request_id, command.prompt, command.params, command.token_ids)
            except ValueError as e:
                self.publish([(command.request_id, e)])

    def publish(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Outputs (or errors) to their requests' streams: one wake-up of the event loop per step, not one per
        request (each wake-up is a write to the loop's pipe and a turn of the loop)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, item in items:
            stream = self.streams.get(request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.queue, (request_id, item)))
            if isinstance(item, BaseException) or item.finished:
                self.streams.pop(request_id, None)
        for loop, deliveries in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(deliver, deliveries)

    def fail_all(self, error: BaseException) -> None:
        for request_id in list(self.streams):
            self.engine.abort(request_id)
            self.publish([(request_id, error)])


def deliver(deliveries: list[tuple[asyncio.Queue, tuple]]) -> None:
    """On the event loop: each (queue, item) of a step into its stream's queue."""
    for stream_queue, item in deliveries:
        stream_queue.put_nowait(item)
