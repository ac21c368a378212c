"""GET /metrics in Prometheus' text format (prometheus-client): the engine's load and counters, read when scraped,
and the latency histograms the service observes per request. One registry per server, no global state."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from llama_jax.generation import Scheduler

PREFIX = "llama_jax"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
GAUGES = {  # load key -> (name, help)
    "running": ("requests_running", "requests being prefilled or decoded"),
    "waiting": ("requests_waiting", "requests queued for a place or for KV blocks"),
    "blocks_used": ("kv_blocks_used", "KV blocks held by running requests"),
    "blocks_free": ("kv_blocks_free", "KV blocks free to hand out (cached ones included)"),
    "blocks_cached": ("kv_blocks_cached", "KV blocks holding a prefix that later requests can reuse"),
}
COUNTERS = {  # engine counter -> (name, help)
    "prompt_tokens": ("prompt_tokens", "prompt tokens computed (prefix-cache hits excluded)"),
    "generated_tokens": ("generation_tokens", "tokens generated"),
    "cached_tokens": ("prefix_cache_hit_tokens", "prompt tokens taken from the prefix cache"),
    "queried_tokens": ("prefix_cache_queried_tokens", "prompt tokens looked up in the prefix cache"),
    "preemptions": ("preemptions", "requests preempted when the KV pool ran out"),
    "proposed_tokens": ("spec_decode_proposed_tokens", "tokens proposed by speculative decoding (--speculate)"),
    "accepted_tokens": ("spec_decode_accepted_tokens", "proposed tokens the model accepted"),
}


class _EngineCollector:
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def collect(self):
        load, counters = self.scheduler.load(), self.scheduler.counters()
        for key, (name, text) in GAUGES.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", text, value=load[key])
        for key, (name, text) in COUNTERS.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", text, value=counters.get(key, 0))
        yield GaugeMetricFamily(f"{PREFIX}_spec_decode_acceptance_rate", "accepted / proposed tokens so far (0: none)",
                                value=counters["accepted_tokens"] / max(counters["proposed_tokens"], 1))


class Metrics:
    """The server's registry: the engine's gauges and counters, and two histograms the service fills."""

    def __init__(self, scheduler: Scheduler):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(scheduler))
        self.time_to_first_token = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                                             "from a request's arrival to its first token", buckets=LATENCY_BUCKETS,
                                             registry=self.registry)
        self.inter_token_latency = Histogram(f"{PREFIX}_inter_token_latency_seconds",
                                             "between a request's tokens (a step's tokens share its time)",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
