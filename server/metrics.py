"""Prometheus metrics of the API and the engine, in a registry of their own (one per app).

The names follow Prometheus' conventions and pass `promtool check metrics`: counters end in `_total`, nothing
else does, every name carries its unit (`_seconds`, `_tokens`, `_sequences`), and no `_created` series are
exported (they double the series count and most dashboards never read them). The request-level series carry
the served model's name as the label `model`; the engine-level gauges and step histograms do not (one process
serves one model, and tools such as the autoscaler read the gauges unlabelled).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from server.scheduler import FAILURE_REASONS, StepStats

DEFAULT_MODEL_NAME = "default"
# From 100 µs, which resolves one decode step of a small model on a CPU, to the 2 minutes of a long generation.
LATENCY_BUCKETS = (
    *(0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05),
    *(0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120),
)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GRAMMAR_OUTCOMES = ("compiled", "cached", "refused", "timeout")
REFUSAL_REASONS = ("validation", "overloaded")  # failures counted by the HTTP side, besides the engine's


class Metrics:
    """Every metric windowlm exports; names start with `windowlm_`."""

    def __init__(self, model_name: str = DEFAULT_MODEL_NAME, registry: CollectorRegistry | None = None) -> None:
        # prometheus_client's documented switch (also PROMETHEUS_DISABLE_CREATED_SERIES=true, read once when it is
        # imported): called here, it holds whatever the environment says. It is process-wide, read at collection.
        disable_created_metrics()
        self.model_name = model_name
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry
        self.requests = Counter(
            "windowlm_requests",
            "HTTP requests by endpoint and status code",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.request_failures = Counter(
            "windowlm_request_failures",
            "Requests that failed, by reason (validation, overloaded, cancelled, stalled, error)",
            ["model", "reason"],
            registry=r,
        )
        self.requests_with_unknown_fields = Counter(
            "windowlm_requests_with_unknown_fields",
            "Requests that carried fields the server does not know and ignored, by endpoint",
            ["model", "endpoint"],
            registry=r,
        )
        self.time_to_first_token = self.request_histogram(
            "windowlm_time_to_first_token_seconds", "Arrival to first generated token", LATENCY_BUCKETS
        )
        self.inter_token_latency = self.request_histogram(
            "windowlm_inter_token_latency_seconds", "Time between two tokens of a sequence", LATENCY_BUCKETS
        )
        self.e2e_latency = self.request_histogram(
            "windowlm_e2e_request_latency_seconds", "Arrival to last token of a sequence", LATENCY_BUCKETS
        )
        self.queue_time = self.request_histogram(
            "windowlm_queue_time_seconds", "Arrival to admission into a slot", LATENCY_BUCKETS
        )
        self.request_prompt_tokens = self.request_histogram(
            "windowlm_request_prompt_tokens", "Prompt tokens per sequence", TOKEN_BUCKETS
        )
        self.request_generation_tokens = self.request_histogram(
            "windowlm_request_generation_tokens", "Generated tokens per sequence", TOKEN_BUCKETS
        )
        self.batch_size = Histogram(
            "windowlm_batch_size_sequences", "Sequences in one decode step", buckets=BATCH_BUCKETS, registry=r
        )
        self.decode_step_seconds = Histogram(
            "windowlm_decode_step_seconds", "Duration of one batched decode step", buckets=LATENCY_BUCKETS, registry=r
        )
        self.add_grammar_series(r)
        self.add_engine_series(r)
        for reason in (*REFUSAL_REASONS, *FAILURE_REASONS):  # every reason exported from the start, at 0
            self.request_failures.labels(model=model_name, reason=reason)

    def add_grammar_series(self, r: CollectorRegistry) -> None:
        """Constraints: how each one a request asked for fared, and how long compiling took."""
        self.grammar_compiles = Counter(
            "windowlm_grammar_compiles",
            "Constraints (JSON schema, regex, grammar, choice) asked for, by outcome: compiled, cached (compiled "
            "or refused before), refused (the library's reason: a 400), timeout (a 400)",
            ["model", "outcome"],
            registry=r,
        )
        self.grammar_compile_seconds = self.request_histogram(
            "windowlm_grammar_compile_seconds", "Time to compile one constraint", LATENCY_BUCKETS
        )
        for outcome in GRAMMAR_OUTCOMES:  # every outcome exported from the start, at 0
            self.grammar_compiles.labels(model=self.model_name, outcome=outcome)

    def add_engine_series(self, r: CollectorRegistry) -> None:
        """The engine's gauges and token counters (unlabelled: one engine per process)."""
        self.requests_running = Gauge("windowlm_requests_running", "Sequences holding a slot", registry=r)
        self.requests_waiting = Gauge("windowlm_requests_waiting", "Sequences waiting for a slot", registry=r)
        self.requests_paused = Gauge(
            "windowlm_requests_paused", "Sequences holding a slot but paused until their reader catches up", registry=r
        )
        self.kv_slots_used = Gauge("windowlm_kv_slots_used", "KV cache slots in use", registry=r)
        self.kv_slots_capacity = Gauge("windowlm_kv_slots_capacity", "KV cache slots in all", registry=r)
        self.torch_threads = Gauge("windowlm_torch_threads", "torch CPU threads the engine runs on", registry=r)
        self.prompt_tokens_total = Counter("windowlm_prompt_tokens", "Prompt tokens of the sequences", registry=r)
        self.prompt_tokens_read_total = Counter(
            "windowlm_prompt_tokens_read",
            "Prompt tokens read into the cache (those beyond the model's reach are not: see read_whole_prompt)",
            registry=r,
        )
        self.generation_tokens_total = Counter("windowlm_generation_tokens", "Tokens generated", registry=r)

    def request_histogram(self, name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
        """A histogram of requests, labelled with the served model (the one child this process observes)."""
        family = Histogram(name, documentation, ["model"], buckets=buckets, registry=self.registry)
        return family.labels(model=self.model_name)

    def answered(self, endpoint: str, status: int) -> None:
        """Count one HTTP request by its (bounded) endpoint label and the status it was answered with."""
        self.requests.labels(model=self.model_name, endpoint=endpoint, status=str(status)).inc()

    def failed(self, reason: str) -> None:
        """Count a request that failed: the one place the failure counter moves."""
        self.request_failures.labels(model=self.model_name, reason=reason).inc()

    def unknown_fields(self, endpoint: str) -> None:
        """Count a request that carried fields the server ignored. The field names are the client's, so they are
        never label values (each new name would be a new series); `endpoint` is the route's own path."""
        self.requests_with_unknown_fields.labels(model=self.model_name, endpoint=endpoint).inc()

    def grammar_compiled(self, outcome: str, seconds: float | None = None) -> None:
        """Count one constraint a request asked for, and the time it took to compile when it was compiled."""
        self.grammar_compiles.labels(model=self.model_name, outcome=outcome).inc()
        if seconds is not None:
            self.grammar_compile_seconds.observe(seconds)

    def observe_step(self, stats: StepStats) -> None:
        """Everything one engine step did."""
        for seconds in stats.queue_seconds:
            self.queue_time.observe(seconds)
        self.prompt_tokens_total.inc(stats.prompt_tokens)
        self.prompt_tokens_read_total.inc(stats.prompt_tokens_read)
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
            elif finish.reason == "refused":  # the request's own fault, found while generating
                self.failed("validation")
            if finish.started:
                request = finish.request
                self.e2e_latency.observe(time.perf_counter() - request.arrived_at)
                self.request_prompt_tokens.observe(len(request.prompt))
                self.request_generation_tokens.observe(request.generated)
        self.kv_slots_used.set(stats.running)
        self.requests_running.set(stats.running)
        self.requests_waiting.set(stats.waiting)
        self.requests_paused.set(stats.paused)
