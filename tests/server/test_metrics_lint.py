"""The /metrics text of a real server, after completions have run, passes Prometheus' own lint (`promtool check
metrics`, from Debian's `prometheus` package) and, checked here without it, the naming rules windowlm keeps:
counters end in `_total` and nothing else does, no `_created` series, histograms of time in `_seconds` with a
lowest bucket that resolves a decode step, and the served model as the label `model` on the request-level series.

Where promtool is missing its test is skipped, unless WINDOWLM_REQUIRE_PROMTOOL=1 (set by .ci/run) makes that a
failure, so CI cannot pass without running it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import enable_created_metrics, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics
from tests.server.conftest import TEST_MODEL, ServerProcess

REQUEST_LEVEL = {
    "windowlm_requests": "counter",
    "windowlm_request_failures": "counter",
    "windowlm_time_to_first_token_seconds": "histogram",
    "windowlm_inter_token_latency_seconds": "histogram",
    "windowlm_e2e_request_latency_seconds": "histogram",
    "windowlm_queue_time_seconds": "histogram",
    "windowlm_request_prompt_tokens": "histogram",
    "windowlm_request_generation_tokens": "histogram",
}
UNITS = ("_seconds", "_tokens", "_sequences")
TIME_WORDS = ("time", "latency", "duration")


@pytest.fixture(scope="module")
def metrics_text(relative_checkpoint) -> Iterator[str]:
    """/metrics once plain, streamed, refused and misdirected requests have been answered. The variable asks
    prometheus_client for `_created` series, which the server must turn off whatever the environment says."""
    server = ServerProcess(relative_checkpoint, env={"PROMETHEUS_DISABLE_CREATED_SERIES": "False"})
    try:
        body = {"model": TEST_MODEL, "prompt": "lint", "max_tokens": 6}
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).status_code == 200
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=30) as stream:
            assert stream.status_code == 200 and "[DONE]" in stream.read().decode()
        assert httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": -1}).status_code == 400
        assert httpx.get(f"{server.url}/no/such/path").status_code == 404
        yield httpx.get(f"{server.url}/metrics", timeout=5).text
    finally:
        server.stop()


@pytest.fixture(scope="module")
def families(metrics_text: str) -> dict[str, Metric]:
    return {family.name: family for family in text_string_to_metric_families(metrics_text)}


def test_promtool_finds_no_problem(metrics_text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        reason = "promtool is not installed (Debian package `prometheus`)"
        if os.environ.get("WINDOWLM_REQUIRE_PROMTOOL") == "1":
            pytest.fail(f"{reason}, and WINDOWLM_REQUIRE_PROMTOOL=1 requires it")
        pytest.skip(reason)
    done = subprocess.run(
        [promtool, "check", "metrics"], input=metrics_text, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr


def test_counters_end_in_total_and_nothing_else_does(families: dict[str, Metric]) -> None:
    for family in families.values():
        names = {sample.name for sample in family.samples}
        if family.type == "counter":
            assert all(name.endswith("_total") for name in names), (family.name, names)  # none yet: not used
        else:
            assert not family.name.endswith("_total") and not any(name.endswith("_total") for name in names), names


def test_no_created_series(metrics_text: str, families: dict[str, Metric]) -> None:
    assert "_created" not in metrics_text
    assert not [s.name for family in families.values() for s in family.samples if s.name.endswith("_created")]


def test_histograms_name_their_unit_and_time_is_in_seconds_from_100_microseconds(families: dict[str, Metric]) -> None:
    histograms = [family for family in families.values() if family.type == "histogram"]
    assert len(histograms) >= 8
    for family in histograms:
        assert family.name.endswith(UNITS), family.name
        about_time = any(word in f"{family.name} {family.documentation}".lower() for word in TIME_WORDS)
        if about_time or family.name.endswith("_seconds"):
            assert family.name.endswith("_seconds"), family.name
            bounds = [float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")]
            assert min(bounds) <= 0.0001, (family.name, min(bounds))
            assert max(b for b in bounds if b != float("inf")) >= 120, family.name


def test_request_level_series_carry_the_served_model(families: dict[str, Metric]) -> None:
    for name, kind in REQUEST_LEVEL.items():
        family = families[name]
        assert family.type == kind and family.samples, name
        assert all(sample.labels.get("model") == TEST_MODEL for sample in family.samples), name
    requests = families["windowlm_requests"].samples
    assert {(s.labels["endpoint"], s.labels["status"]) for s in requests} >= {
        ("/v1/completions", "200"),
        ("/v1/completions", "400"),
        ("other", "404"),
    }
    failures = {s.labels["reason"]: s.value for s in families["windowlm_request_failures"].samples}
    assert failures["validation"] >= 1 and {"overloaded", "cancelled", "stalled", "error"} <= set(failures)
    generated = families["windowlm_request_generation_tokens"].samples
    assert next(s.value for s in generated if s.name.endswith("_count")) == 2  # both completions
    assert "windowlm_kv_slots_capacity" in families and "windowlm_kv_slots_total" not in families


def test_unknown_fields_are_counted_by_endpoint_never_by_field_name() -> None:
    metrics = Metrics("served")
    metrics.unknown_fields("/v1/completions")
    metrics.unknown_fields("/v1/completions")
    labels = {"model": "served", "endpoint": "/v1/completions"}
    assert metrics.registry.get_sample_value("windowlm_requests_with_unknown_fields_total", labels) == 2
    (family,) = [f for f in metrics.registry.collect() if f.name == "windowlm_requests_with_unknown_fields"]
    assert {key for sample in family.samples for key in sample.labels} == {"model", "endpoint"}


def test_created_series_stay_off_even_when_switched_on_before() -> None:
    enable_created_metrics()  # as the environment variable's default, or another library, may leave it
    metrics = Metrics()
    metrics.answered("/health", 200)
    metrics.queue_time.observe(0.5)
    assert b"_created" not in generate_latest(metrics.registry)
