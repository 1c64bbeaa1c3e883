"""Prometheus metrics for the server, on a registry of its own (one per app).

Per-request latencies are observed by :class:`RequestTimer`; engine state (queue
lengths, KV-cache usage, token counters) is read from the engine thread's latest
snapshot when /metrics is scraped.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from miaotui.engine.llm_engine import RequestOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class _EngineCollector:
    def __init__(self, async_engine):
        self.async_engine = async_engine

    def collect(self):
        s = self.async_engine.snapshot
        yield GaugeMetricFamily("miaotui_num_running_seqs", "Sequences in the running batch",
                                value=s["running"])
        yield GaugeMetricFamily("miaotui_num_waiting_seqs", "Sequences waiting to be scheduled",
                                value=self.async_engine.num_waiting)
        yield GaugeMetricFamily("miaotui_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use",
                                value=s["kv_usage"])
        rate = s["prefix_hits"] / s["prefix_queries"] if s["prefix_queries"] else 0.0
        yield GaugeMetricFamily("miaotui_prefix_cache_hit_rate",
                                "Prompt tokens found in the prefix cache / prompt tokens looked up",
                                value=rate)
        yield CounterMetricFamily("miaotui_prompt_tokens", "Prompt tokens received",
                                  value=s["prompt_tokens"])
        yield CounterMetricFamily("miaotui_generation_tokens", "Tokens generated",
                                  value=s["generation_tokens"])
        yield CounterMetricFamily("miaotui_preemptions", "Sequences preempted for lack of KV blocks",
                                  value=s["preemptions"])
        spec = s.get("spec")
        if spec is not None:   # speculative decoding (--speculative)
            yield CounterMetricFamily("miaotui_spec_decode_num_draft_tokens", "Guessed tokens verified",
                                      value=spec["proposed"])
            yield CounterMetricFamily("miaotui_spec_decode_num_accepted_tokens", "Guessed tokens accepted",
                                      value=spec["accepted"])
            yield CounterMetricFamily("miaotui_spec_decode_num_verify_steps",
                                      "Sequence-steps that verified guesses", value=spec["steps"])
            yield GaugeMetricFamily("miaotui_spec_decode_acceptance_rate", "Accepted / guessed tokens",
                                    value=spec["accepted"] / spec["proposed"] if spec["proposed"] else 0.0)


class Metrics:
    def __init__(self, async_engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(async_engine))
        self.requests = Counter("miaotui_http_requests", "HTTP requests by path and status code",
                                ["path", "status"], registry=self.registry)
        self.finished = Counter("miaotui_requests_finished", "Generation requests by finish reason",
                                ["reason"], registry=self.registry)
        self.ttft = Histogram("miaotui_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("miaotui_time_per_output_token_seconds",
                              "Mean time between output tokens, per request",
                              buckets=TOKEN_BUCKETS, registry=self.registry)
        self.e2e = Histogram("miaotui_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Follows one HTTP request's outputs and records its latencies when it ends."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.start = time.monotonic()
        self.first: float | None = None
        self.tokens: dict[tuple[str, int], int] = {}   # (request id, choice) -> tokens

    def on_output(self, out: RequestOutput) -> None:
        for o in out.outputs:
            if o.token_ids:
                if self.first is None:
                    self.first = time.monotonic()
                self.tokens[out.request_id, o.index] = len(o.token_ids)

    def done(self, reasons: list[str]) -> None:
        """The request completed normally; `reasons` are its choices' finish reasons."""
        end = time.monotonic()
        for reason in reasons:
            self.metrics.finished.labels(reason).inc()
        self.metrics.e2e.observe(end - self.start)
        if self.first is not None:
            self.metrics.ttft.observe(self.first - self.start)
            longest = max(self.tokens.values())
            if longest > 1:
                self.metrics.tpot.observe((end - self.first) / (longest - 1))

    def aborted(self) -> None:
        self.metrics.finished.labels("abort").inc()
