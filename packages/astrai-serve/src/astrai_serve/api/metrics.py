"""Prometheus metrics, in a registry of the app's own (two apps in one process, as in tests,
never share or clash).

Latencies are observed when a request ends, from the engine's own timestamps: time to first
token (arrival to first token), inter-token latency (the gap before each later token) and
end-to-end latency. Engine state (running, waiting, KV pages, prefix hits, preemptions) is read
from `engine.get_stats()` at scrape time, so it is never stale.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from astrai_serve.engine import InferenceEngine
from astrai_serve.request import GenerateResult

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class EngineCollector(Collector):
    """Gauges and counters read from the engine when Prometheus scrapes."""

    def __init__(self, engine: Callable[[], InferenceEngine | None]) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self._engine()
        yield GaugeMetricFamily("astrai_engine_healthy", "1 while the engine serves, 0 while "
                                "loading or after it failed.",
                                value=1.0 if engine is not None and engine.healthy else 0.0)
        if engine is None:
            return
        stats = engine.get_stats()
        gauges = {
            "num_requests_running": ("Requests in the running batch.", stats["running"]),
            "num_requests_waiting": ("Requests waiting to be scheduled.", stats["waiting"]),
            "kv_cache_usage_ratio": ("Fraction of KV cache pages held by requests.",
                                     stats["kv_pages_used"] / max(stats["kv_pages_total"], 1)),
            "kv_cache_pages_used": ("KV cache pages held by requests.", stats["kv_pages_used"]),
            "kv_cache_pages_cached": ("Free KV pages still holding a reusable prefix.",
                                      stats["kv_pages_cached"]),
            "kv_cache_pages_total": ("KV cache pages in all.", stats["kv_pages_total"]),
            "prefix_cache_hit_rate": ("Prompt tokens served from the prefix cache, over all "
                                      "prompt tokens looked up.", stats["prefix_hit_rate"]),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"astrai_{name}", doc, value=float(value))
        yield CounterMetricFamily("astrai_preemptions", "Running requests preempted for lack "
                                  "of KV pages.", value=float(stats["preemptions"]))


class Metrics:
    def __init__(self, engine: Callable[[], InferenceEngine | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("astrai_time_to_first_token_seconds", "Arrival to first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("astrai_inter_token_latency_seconds", "Gap before each token "
                             "after the first.", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("astrai_e2e_request_latency_seconds", "Arrival to the last token.",
                             buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("astrai_prompt_tokens", "Prompt tokens of ended requests.",
                                     registry=r)
        self.generation_tokens = Counter("astrai_generation_tokens", "Tokens generated.",
                                         registry=r)
        self.requests = Counter("astrai_requests", "Ended requests, by finish reason.",
                                ["finish_reason"], registry=r)
        r.register(EngineCollector(engine))

    def observe(self, result: GenerateResult, token_times: list[float]) -> None:
        """One engine request ended (or was abandoned: then it counts as an abort)."""
        reason = result.finish_reason if result.done else "abort"
        self.requests.labels(reason).inc()
        self.prompt_tokens.inc(result.prompt_tokens)
        self.generation_tokens.inc(result.generated_tokens)
        if reason not in ("stop", "length"):
            return
        if result.first_token_time is not None:
            self.ttft.observe(result.first_token_time - result.arrival_time)
        for before, after in itertools.pairwise(token_times):
            self.itl.observe(after - before)
        end = result.finish_time or time.perf_counter()
        self.e2e.observe(end - result.arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
