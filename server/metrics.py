"""Prometheus metrics: engine state read at scrape time, request latencies observed as they happen."""
import time

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from llmserve.async_engine import AsyncEngine
from llmserve.outputs import RequestOutput

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class EngineCollector(Collector):
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self):
        state = self.engine.state()
        queries, hits = state.prefix_cache_queries, state.prefix_cache_hits
        yield GaugeMetricFamily("llmserve:num_requests_running", "Requests in the running batch", value=state.running)
        yield GaugeMetricFamily("llmserve:num_requests_waiting", "Requests waiting to be scheduled",
                                value=state.waiting)
        yield GaugeMetricFamily("llmserve:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1)",
                                value=state.kv_cache_usage)
        yield GaugeMetricFamily("llmserve:kv_cache_used_blocks", "KV-cache blocks held by requests",
                                value=state.kv_cache_used_blocks)
        yield GaugeMetricFamily("llmserve:prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up",
                                value=hits / queries if queries else 0.0)
        yield CounterMetricFamily("llmserve:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  value=queries)
        yield CounterMetricFamily("llmserve:prefix_cache_hits", "Prompt tokens found in the prefix cache", value=hits)
        yield CounterMetricFamily("llmserve:prompt_tokens", "Prompt tokens computed", value=state.prompt_tokens)
        yield CounterMetricFamily("llmserve:generation_tokens", "Tokens generated", value=state.generation_tokens)
        yield CounterMetricFamily("llmserve:num_preemptions", "Requests preempted for lack of KV blocks",
                                  value=state.preemptions)
        yield CounterMetricFamily("llmserve:engine_steps", "Batches run", value=state.steps)
        yield GaugeMetricFamily("llmserve:max_batch_size", "Most requests run in one step so far",
                                value=state.max_batch_size)


class Metrics:
    def __init__(self, engine: AsyncEngine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=LATENCY_BUCKETS, registry=self.registry)

        self.ttft = histogram("llmserve:time_to_first_token_seconds", "Time from arrival to the first token")
        self.itl = histogram("llmserve:inter_token_latency_seconds", "Time between output tokens")
        self.e2e = histogram("llmserve:e2e_request_latency_seconds", "Time from arrival to the last token")

    def timer(self) -> "RequestTimer":
        return RequestTimer(self)


class RequestTimer:
    """Observes one request's latencies from its successive outputs."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.start = self.last = time.perf_counter()
        self.num_tokens = 0

    def observe(self, output: RequestOutput) -> None:
        now = time.perf_counter()
        num_tokens = sum(len(c.token_ids) for c in output.outputs)
        if num_tokens > self.num_tokens:
            if self.num_tokens == 0:
                self.metrics.ttft.observe(now - self.start)
            else:
                gap = (now - self.last) / (num_tokens - self.num_tokens)
                for _ in range(num_tokens - self.num_tokens):
                    self.metrics.itl.observe(gap)
            self.num_tokens, self.last = num_tokens, now
        if output.finished:
            self.metrics.e2e.observe(now - self.start)
