"""Prometheus metrics of the API and the engine, in a registry of their own (one per app)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server.scheduler import FAILURE_REASONS, StepStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric windowlm exports; names start with `windowlm_`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry
        self.requests = Counter(
            "windowlm_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.request_failures = Counter(
            "windowlm_request_failures",
            "Requests that failed, by reason (validation, overloaded, cancelled, error)",
            ["reason"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "windowlm_time_to_first_token_seconds",
            "Arrival to first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "windowlm_inter_token_latency_seconds",
            "Time between two tokens of a sequence",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "windowlm_e2e_request_latency_seconds",
            "Arrival to last token of a sequence",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "windowlm_queue_time_seconds", "Arrival to admission into a slot", buckets=LATENCY_BUCKETS, registry=r
        )
        self.request_prompt_tokens = Histogram(
            "windowlm_request_prompt_tokens", "Prompt tokens per sequence", buckets=TOKEN_BUCKETS, registry=r
        )
        self.request_generation_tokens = Histogram(
            "windowlm_request_generation_tokens", "Generated tokens per sequence", buckets=TOKEN_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "windowlm_batch_size", "Sequences in one decode step", buckets=BATCH_BUCKETS, registry=r
        )
        self.decode_step_seconds = Histogram(
            "windowlm_decode_step_seconds", "Duration of one batched decode step", buckets=LATENCY_BUCKETS, registry=r
        )
        self.requests_running = Gauge("windowlm_requests_running", "Sequences holding a slot", registry=r)
        self.requests_waiting = Gauge("windowlm_requests_waiting", "Sequences waiting for a slot", registry=r)
        self.requests_paused = Gauge(
            "windowlm_requests_paused", "Sequences holding a slot but paused until their reader catches up", registry=r
        )
        self.kv_slots_used = Gauge("windowlm_kv_slots_used", "KV cache slots in use", registry=r)
        self.kv_slots_total = Gauge("windowlm_kv_slots_total", "KV cache slots in all", registry=r)
        self.prompt_tokens_total = Counter("windowlm_prompt_tokens", "Prompt tokens read into the cache", registry=r)
        self.generation_tokens_total = Counter("windowlm_generation_tokens", "Tokens generated", registry=r)

    def failed(self, reason: str) -> None:
        """Count a request that failed: the one place the failure counter moves."""
        self.request_failures.labels(reason=reason).inc()

    def observe_step(self, stats: StepStats) -> None:
        """Everything one engine step did."""
        for seconds in stats.queue_seconds:
            self.queue_time.observe(seconds)
        self.prompt_tokens_total.inc(stats.prompt_tokens)
        self.generation_tokens_total.inc(stats.generated_tokens)
        for seconds in stats.first_token_seconds:
            self.time_to_first_token.observe(seconds)
        for seconds in stats.inter_token_seconds:
            self.inter_token_latency.observe(seconds)
        if stats.decode_seconds is not None:
            self.decode_step_seconds.observe(stats.decode_seconds)
            self.batch_size.observe(stats.decode_batch)
        for finish in stats.finishes:
            if finish.reason in FAILURE_REASONS:
                self.failed(finish.reason)
            if finish.started:
                request = finish.request
                self.e2e_latency.observe(time.perf_counter() - request.arrived_at)
                self.request_prompt_tokens.observe(len(request.prompt))
                self.request_generation_tokens.observe(request.generated)
        self.kv_slots_used.set(stats.running)
        self.requests_running.set(stats.running)
        self.requests_waiting.set(stats.waiting)
        self.requests_paused.set(stats.paused)
