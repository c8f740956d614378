"""AsyncEngine: the server's one seam to the engine.

The LLMEngine steps in a process of its own (by default: the server's Python, its HTTP parsing and its per-token
streaming never hold up a step, nor a step the server), or in a thread of this process (`in_process=True`). Either
way it talks to this side over one pipe:
- this side sends commands: add the prompts of one call, abort a request, stop;
- each turn of the engine loop (`EngineLoop`) sends back one message: the calls it accepted or refused, the outputs
  of the requests that advanced as deltas (the new tokens, text and logprobs: a message does not grow with the
  outputs' length), and the engine's counters.
A reader thread hands each message to the asyncio loop in one wake-up; each call's `RequestStream` applies the deltas
and yields each request's whole output so far (a slow reader skips straight to the newest).
"""
import asyncio
import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from llmserve.config import EngineConfig
from llmserve.engine import LLMEngine
from llmserve.executor import WorkerDied
from llmserve.loader import load_engine_tokenizer
from llmserve.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from llmserve.sampling_params import SamplingParams
from llmserve.tokenizer import tokenize

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What the server knows of the served model; fixed once the engine is built."""

    model_path: str
    max_model_len: int
    vocab_size: int
    max_logprobs: int
    tokenizer: Any  # the HF tokenizer (this process's own copy), None with skip_tokenizer_init
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
class AddRequests:
    """The prompts of one call: all accepted, or all refused with the first error."""

    request_ids: list[str]
    prompts: list[str | list[int]]
    token_ids: list[list[int]]
    params: SamplingParams


@dataclass
class AbortRequest:
    request_id: str


STOP = "stop"
ACCEPTED = "accepted"


@dataclass
class CompletionDelta:
    """What one completion gained in a step."""

    index: int
    text_kept: int  # characters of the text sent so far that stand (fewer when a stop string cut it)
    new_text: str
    new_token_ids: list[int]
    new_logprobs: list[PositionLogprobs] | None
    cumulative_logprob: float | None
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class OutputDelta:
    completions: list[CompletionDelta]
    new_prompt_logprobs: list[PositionLogprobs | None] | None
    finished: bool
    num_cached_tokens: int
    metrics: dict


class EngineFault(RuntimeError):
    """A step of the engine failed; the requests in flight were aborted, the engine goes on."""


class EngineDeadError(RuntimeError):
    """The engine has stopped; no request can be served."""


# ---- the engine's side ------------------------------------------------------------------------------------------

class EngineLoop:
    """Steps the engine while it has work, between turns taking the commands that arrived and sending one message.

    A grammar is compiled on a thread of its own (xgrammar releases the GIL), so a large JSON schema never holds up
    the steps of the other requests; its call is added once compiled."""

    def __init__(self, engine: LLMEngine, conn: Connection) -> None:
        self.engine, self.conn = engine, conn
        self.sent: dict[str, dict] = {}  # request id -> what its deltas have carried so far
        self.compiling: list[tuple[Future, AddRequests]] = []
        self.compiler = ThreadPoolExecutor(2, thread_name_prefix="llmserve-grammar")
        self.items: list[tuple[str, Any]] = []  # this turn's (request id, ACCEPTED | OutputDelta | error)
        self.stopping = False

    def run(self) -> None:
        error = None
        try:
            self.flush(force=True)
            while not self.stopping:
                busy = self.engine.has_unfinished_requests()
                self.receive(0 if busy else 0.005 if self.compiling else 1.0)  # idle: a dead worker shows in 1 s
                self.add_compiled()
                if not self.engine.has_unfinished_requests():
                    self.engine.check_health()
                    self.flush(force=busy)
                    continue
                try:
                    outputs = self.engine.step()
                except WorkerDied:
                    raise  # the engine cannot go on: it stops, /health turns 503 and the server exits
                except Exception as e:
                    logger.exception("engine step failed; aborting the %d requests in flight", len(self.sent))
                    self.fail_all(EngineFault(f"the engine failed: {type(e).__name__}: {e}"))
                else:
                    self.items += [(output.request_id, self.delta(output)) for output in outputs]
                self.flush(force=True)
        except BaseException as e:
            logger.exception("the engine loop died")
            error = f"{type(e).__name__}: {e}"
        finally:
            self.compiler.shutdown(wait=False, cancel_futures=True)
            try:
                self.engine.shutdown()
            finally:
                try:
                    self.conn.send(("dead", error))
                except (OSError, ValueError):
                    pass  # the server has gone

    def receive(self, timeout: float) -> None:
        if not self.conn.poll(timeout):
            return
        while True:
            try:
                command = self.conn.recv()
            except EOFError:  # the server has gone
                command = STOP
            if command == STOP:
                self.stopping = True
                return
            if isinstance(command, AbortRequest):
                self.abort(command.request_id)
            elif command.params.structured_outputs is not None:
                self.compiling.append((self.compiler.submit(self.engine.compile_structured_outputs, command.params),
                                       command))
            else:
                self.add(command)
            if not self.conn.poll():
                return

    def add_compiled(self) -> None:
        for entry in [entry for entry in self.compiling if entry[0].done()]:
            self.compiling.remove(entry)
            future, command = entry
            if isinstance(future.exception(), ValueError):
                self.items.append((command.request_ids[0], future.exception()))
            else:
                self.add(command)  # another error raises again here, where it is handled as any other

    def add(self, command: AddRequests) -> None:
        try:
            for token_ids in command.token_ids:
                self.engine.validate(token_ids, command.params)
            for request_id, prompt, token_ids in zip(command.request_ids, command.prompts, command.token_ids):
                self.engine.add_request(request_id, prompt, command.params, token_ids)
                self.sent[request_id] = {"prompt_logprobs": 0}
        except ValueError as e:
            for request_id in command.request_ids:
                self.abort(request_id)
            self.items.append((command.request_ids[0], e))
            return
        self.items += [(request_id, ACCEPTED) for request_id in command.request_ids]

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self.sent.pop(request_id, None)
        self.compiling = [(f, c) for f, c in self.compiling if request_id not in c.request_ids]

    def fail_all(self, error: BaseException) -> None:
        for request_id in list(self.sent):
            self.abort(request_id)
            self.items.append((request_id, error))

    def delta(self, output: RequestOutput) -> OutputDelta:
        sent = self.sent[output.request_id]
        completions = []
        for c in output.outputs:
            text, tokens, logprobs = sent.get(c.index, ("", 0, 0))
            kept = len(text) if c.text.startswith(text) else len(os.path.commonprefix([text, c.text]))
            completions.append(CompletionDelta(c.index, kept, c.text[kept:], c.token_ids[tokens:],
                                               c.logprobs[logprobs:] if c.logprobs is not None else None,
                                               c.cumulative_logprob, c.finish_reason, c.stop_reason))
            sent[c.index] = (c.text, len(c.token_ids), len(c.logprobs or ()))
        prompt_logprobs = None
        if output.prompt_logprobs is not None:
            prompt_logprobs = output.prompt_logprobs[sent["prompt_logprobs"]:]
            sent["prompt_logprobs"] = len(output.prompt_logprobs)
        if output.finished:
            del self.sent[output.request_id]
        return OutputDelta(completions, prompt_logprobs, output.finished, output.num_cached_tokens, output.metrics)

    def flush(self, force: bool) -> None:
        """Send this turn's items with the engine's counters (also when there are none, after a step)."""
        if self.items or force:
            self.conn.send(("step", self.items, engine_state(self.engine)))
            self.items = []


def engine_state(engine: LLMEngine) -> EngineState:
    scheduler, stats = engine.scheduler, engine.stats
    return EngineState(len(scheduler.running), len(scheduler.waiting), engine.kv.usage, engine.kv.num_used_blocks,
                       scheduler.prefix_cache_queries, scheduler.prefix_cache_hits, stats["prompt_tokens"],
                       stats["generation_tokens"], scheduler.num_preemptions, stats["steps"], stats["max_batch_size"])


def model_info(engine: LLMEngine) -> ModelInfo:
    return ModelInfo(engine.model_path, engine.max_model_len, engine.vocab_size, engine.config.max_logprobs, None,
                     engine.chat_template, engine.sampling_defaults, engine.platform.name, engine.runner.backend.name,
                     str(engine.runner.dtype).removeprefix("torch."))


def engine_process(config: EngineConfig, conn: Connection, log_level: int) -> None:
    """The engine process: build the engine, say it is ready (or why it is not), run the loop until told to stop."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # a terminal's Ctrl-C reaches the whole process group: the server decides when the engine stops
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine = LLMEngine(config)
    except BaseException as e:
        conn.send(("failed", isinstance(e, ValueError), f"{type(e).__name__}: {e}" if not isinstance(e, ValueError)
                   else str(e)))
        raise
    conn.send(("ready", model_info(engine)))
    EngineLoop(engine, conn).run()


# ---- the server's side ------------------------------------------------------------------------------------------

class RequestStream:
    """The outputs of the requests of one call (one per prompt) as (prompt index, cumulative output)."""

    def __init__(self, engine: "AsyncEngine", request_ids: list[str], prompts: list, token_ids: list[list[int]]):
        self.engine = engine
        self.index = {request_id: i for i, request_id in enumerate(request_ids)}
        self.outputs = {request_id: RequestOutput(request_id, prompt if isinstance(prompt, str) else None, ids, None,
                                                  [], False)
                        for request_id, prompt, ids in zip(request_ids, prompts, token_ids)}
        self.pending = set(request_ids)
        self.unconfirmed = set(request_ids)
        self.changed: dict[str, None] = {}  # requests with outputs not yet yielded, in order
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    async def accepted(self) -> None:
        """Wait until the engine has accepted the call; raise its error (a ValueError naming the field) if not."""
        while self.unconfirmed:
            self.take(*await self.queue.get())

    def take(self, request_id: str, item: Any) -> None:
        if isinstance(item, BaseException):
            self.abort()
            raise item
        if item == ACCEPTED:
            self.unconfirmed.discard(request_id)
        else:
            apply_delta(self.outputs[request_id], item)
            self.changed[request_id] = None

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self.pending:
            if not self.changed:
                self.take(*await self.queue.get())
            while not self.queue.empty():
                self.take(*self.queue.get_nowait())
            changed, self.changed = self.changed, {}
            for request_id in changed:
                output = self.outputs[request_id]
                if output.finished:
                    self.pending.discard(request_id)
                yield self.index[request_id], output

    def abort(self) -> None:
        """Stop the requests not yet done; their KV blocks are freed before the next step."""
        for request_id in self.pending:
            self.engine.abort(request_id)
        self.pending.clear()


def apply_delta(output: RequestOutput, delta: OutputDelta) -> None:
    if delta.new_prompt_logprobs:
        output.prompt_logprobs = (output.prompt_logprobs or []) + delta.new_prompt_logprobs
    for d in delta.completions:
        while len(output.outputs) <= d.index:
            output.outputs.append(CompletionOutput(len(output.outputs), "", [], None, None))
        c = output.outputs[d.index]
        c.text = c.text[:d.text_kept] + d.new_text
        c.token_ids.extend(d.new_token_ids)
        if d.new_logprobs is not None:
            c.logprobs = (c.logprobs or []) + d.new_logprobs
        c.cumulative_logprob, c.finish_reason, c.stop_reason = d.cumulative_logprob, d.finish_reason, d.stop_reason
    output.finished, output.num_cached_tokens, output.metrics = delta.finished, delta.num_cached_tokens, delta.metrics


class AsyncEngine:
    def __init__(self, config: EngineConfig, in_process: bool = False) -> None:
        self.conn, theirs = multiprocessing.Pipe()
        self.engine: LLMEngine | None = None  # this process's engine, in_process only
        if in_process:
            self.engine = LLMEngine(config)
            info = dataclasses.replace(model_info(self.engine), tokenizer=self.engine.tokenizer)
            self.worker = threading.Thread(target=EngineLoop(self.engine, theirs).run, name="llmserve-engine",
                                           daemon=True)
            self.worker.start()
        else:
            self.worker = multiprocessing.get_context("spawn").Process(
                target=engine_process, args=(config, theirs, logging.getLogger().level), name="llmserve-engine")
            self.worker.start()
            theirs.close()  # so that a crash of the engine process reads as the end of the pipe
            info = self.wait_until_ready()
            info = dataclasses.replace(info, tokenizer=load_engine_tokenizer(config, info.model_path))
        self.info = info
        self.streams: dict[str, RequestStream] = {}
        self.latest_state = EngineState(0, 0, 0.0, 0, 0, 0, 0, 0, 0, 0, 0)  # until the engine's first message
        self.send_lock = threading.Lock()
        self.stopping = False
        self.dead = False
        self.error: str | None = None  # why the engine died
        self.reader = threading.Thread(target=self.read, name="llmserve-engine-reader", daemon=True)
        self.reader.start()

    def wait_until_ready(self) -> ModelInfo:
        try:
            message = self.conn.recv()
        except EOFError:
            self.worker.join()
            raise RuntimeError(f"the engine process exited while loading (exit code {self.worker.exitcode})") from None
        if message[0] == "failed":
            _, is_value_error, text = message
            self.worker.join()
            raise (ValueError if is_value_error else RuntimeError)(text)
        return message[1]

    @property
    def alive(self) -> bool:
        return not self.dead and not self.stopping

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return tokenize(self.info.tokenizer, prompt)

    def state(self) -> EngineState:
        return self.latest_state

    async def add_requests(self, request_id: str, prompts: list[str | list[int]], params: SamplingParams,
                           prompt_token_ids: list[list[int]]) -> RequestStream:
        """One request per prompt, once the engine has accepted them all (a ValueError when it refuses them)."""
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        request_ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        stream = RequestStream(self, request_ids, prompts, prompt_token_ids)
        for child_id in request_ids:
            self.streams[child_id] = stream
        self.send(AddRequests(request_ids, prompts, prompt_token_ids, params))
        await stream.accepted()
        return stream

    def abort(self, request_id: str) -> None:
        self.streams.pop(request_id, None)
        self.send(AbortRequest(request_id))

    def send(self, command: AddRequests | AbortRequest | str) -> None:
        try:
            with self.send_lock:
                self.conn.send(command)
        except (OSError, ValueError):  # the engine has gone: only a new call needs telling
            if isinstance(command, AddRequests):
                raise EngineDeadError("the engine is not running") from None

    def shutdown(self) -> None:
        self.stopping = True
        self.send(STOP)
        self.worker.join(timeout=60)
        if isinstance(self.worker, multiprocessing.process.BaseProcess) and self.worker.is_alive():
            logger.warning("the engine process did not stop within 60 s; killing it")
            self.worker.kill()
            self.worker.join()
        self.reader.join(timeout=5)
        self.conn.close()

    def read(self) -> None:
        """The reader thread: each message of the engine to the streams, in one wake-up of their loop."""
        try:
            while True:
                message = self.conn.recv()
                if message[0] == "dead":
                    if message[1] is not None:
                        self.error = message[1]
                    return
                _, items, self.latest_state = message
                self.publish(items)
        except (EOFError, OSError):
            if not self.stopping:
                self.error = "the engine process exited"
                logger.error("the engine process exited (exit code %s)", getattr(self.worker, "exitcode", None))
        finally:
            self.dead = True
            self.publish([(request_id, EngineDeadError("the engine has stopped")) for request_id in self.streams])

    def publish(self, items: list[tuple[str, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, item in items:
            stream = self.streams.get(request_id)
            if stream is None:
                continue
            by_loop.setdefault(stream.loop, []).append((stream.queue, (request_id, item)))
            if isinstance(item, BaseException) or (isinstance(item, OutputDelta) and item.finished):
                self.streams.pop(request_id, None)
        for loop, deliveries in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(deliver, deliveries)


def deliver(deliveries: list[tuple[asyncio.Queue, tuple]]) -> None:
    """On the event loop: each (queue, item) of a message into its stream's queue."""
    for stream_queue, item in deliveries:
        stream_queue.put_nowait(item)
