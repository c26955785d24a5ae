"""Prometheus metrics, with vLLM's names (prefix `chatpager:` for `vllm:`) where one exists.

Engine figures (block pool, prefix cache, queue lengths) are read from the EngineLoop's latest
CacheSnapshot at scrape time, so they cost nothing between scrapes and never lag by more than
the snapshot interval. Request figures (latencies, token counts) are recorded by the serving
code as requests run. Each server has its own registry: two servers in one process (tests)
never mix their counts.
"""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from chatpager.engine.loop.client import EngineLoop

PREFIX = "chatpager:"
TTFT_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
# (metric, stats key, help) for the engine's own cumulative counters
ENGINE_COUNTERS = (
    ("prefix_cache_queries", "prefix_query_tokens", "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "prefix_hit_tokens", "Prompt tokens found in the prefix cache."),
    ("num_preemptions", "preemptions", "Sequences preempted because the pool ran out."),
    ("evictions", "evictions", "Cached blocks evicted (their content dropped) to be reused."),
    ("cow_copies", "cow_copies", "Copy-on-write block copies."),
    ("spec_decode_num_draft_tokens", "spec_proposed_tokens", "Tokens proposed by speculative decoding."),
    ("spec_decode_num_accepted_tokens", "spec_accepted_tokens", "Proposed tokens the model accepted."),
)


class EngineCollector:
    """Reads the engine's figures from the EngineLoop's latest snapshot on each scrape."""

    def __init__(self, engine: EngineLoop) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        snapshot = self.engine.snapshot
        if snapshot is None:  # still loading: nothing to report yet
            return
        s = snapshot.stats
        yield _gauge("kv_cache_usage_perc", "KV-cache usage: 1 means every block is held.",
                     s["used_blocks"] / s["num_blocks"])
        yield _gauge("num_requests_running", "Sequences in the running batch.", s["running"])
        yield _gauge("num_requests_waiting", "Sequences waiting to be scheduled.", s["waiting"])
        yield _gauge("num_requests_swapped", "Sequences swapped out to CPU.", s["swapped"])
        for name, key, help in ENGINE_COUNTERS:
            counter = CounterMetricFamily(PREFIX + name, help)
            counter.add_metric([], s[key])
            yield counter
        blocks = GaugeMetricFamily(PREFIX + "kv_blocks", "Blocks of the pool by state: used (held by "
                                   "a sequence), cached (free, content still hittable), free (empty).",
                                   labels=["state"])
        blocks.add_metric(["used"], s["used_blocks"])
        blocks.add_metric(["cached"], s["cached_blocks"])
        blocks.add_metric(["free"], s["free_blocks"] - s["cached_blocks"])
        yield blocks
        yield _gauge("shared_blocks", "Blocks held by more than one sequence.", s["shared_blocks"])
        yield _gauge("sharing_ratio", "Block-table entries per held block (1: nothing shared).",
                     s["sharing_ratio"])


def _gauge(name: str, help: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, help, value=value)


class ServerMetrics:
    def __init__(self, engine: EngineLoop) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(EngineCollector(engine))
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between output tokens.",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of served requests.",
                                     registry=self.registry)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.",
                                         registry=self.registry)
        self.cached_tokens = Counter(PREFIX + "prompt_tokens_cached", "Prompt tokens served from "
                                     "the prefix cache.", registry=self.registry)
        self.requests = Counter(PREFIX + "request_success", "Requests finished, by reason.",
                                ["finished_reason"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
