"""Continuous batching: each step, running requests first, then waiting ones, under one token budget.

Every scheduled request "catches up" by some tokens: a decode is 1 token, a prefill (or a chunk of
one) is many. When the block pool runs out, the newest running request is preempted: its blocks
are freed and it waits again, to be recomputed later.
"""
from collections import deque
from dataclasses import dataclass

from llmserve.config import EngineConfig
from llmserve.kv_cache import KVCacheManager
from llmserve.request import Request, Status


@dataclass
class ScheduledBatch:
    requests: list[Request]
    num_new_tokens: list[int]
    num_preempted: int = 0
    continuation: bool = False  # one more decode token for each request of the step still running (async scheduling)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager, max_model_len: int) -> None:
        self.max_num_seqs, self.budget = config.max_num_seqs, config.max_num_batched_tokens
        self.max_model_len = max_model_len
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.prefix_cache_queries = self.prefix_cache_hits = 0  # prompt tokens looked up / found

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, can_preempt: bool = True, max_requests: int | None = None) -> ScheduledBatch:
        """The next batch, of at most `max_requests` requests (a pipeline microbatch's share). A running request with
        nothing to compute (its token is still in flight in another microbatch) is skipped; without `can_preempt`,
        the batch stops where the blocks run out."""
        batch = ScheduledBatch([], [])
        budget = self.budget
        room = max_requests or self.max_num_seqs
        i = 0
        while i < len(self.running) and budget > 0 and len(batch.requests) < room:
            request = self.running[i]
            count = min(request.num_tokens - request.num_computed_tokens, budget)
            if count == 0:
                i += 1
                continue
            if self.kv.allocate(request, count):
                batch.requests.append(request)
                batch.num_new_tokens.append(count)
                budget -= count
                i += 1
                continue
            if not can_preempt:
                return batch
            self.preempt(self.running.pop())  # the newest; it may be `request` itself
            batch.num_preempted += 1
        if batch.num_preempted:
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and len(batch.requests) < room:
            request = self.waiting[0]
            cached = self.kv.find_cached_prefix(request) if request.num_computed_tokens == 0 else []
            count = min(request.num_tokens - request.num_computed_tokens - len(cached) * self.kv.block_size, budget)
            if not self.kv.allocate(request, count, cached):
                break
            if request.num_computed_tokens == 0:
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += len(cached) * self.kv.block_size
            if cached:
                request.num_computed_tokens = request.num_cached_tokens = len(cached) * self.kv.block_size
            self.waiting.popleft()
            request.status = Status.RUNNING
            self.running.append(request)
            batch.requests.append(request)
            batch.num_new_tokens.append(count)
            budget -= count
        return batch

    def preempt(self, request: Request) -> None:
        self.kv.release(request)
        request.num_computed_tokens = 0
        request.status = Status.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def finish(self, request: Request) -> None:
        if request.status == Status.RUNNING:
            self.running.remove(request)
        elif request.status == Status.WAITING:
            self.waiting.remove(request)
        self.kv.release(request)
        request.status = Status.FINISHED
