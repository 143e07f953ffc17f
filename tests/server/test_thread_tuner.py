"""Threads that follow the host: the CPU-time readings, the count they give, the change only when two readings
agree, and the real thing beside a busy process (which needs 2 CPUs: skipped, saying so, on fewer)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from model.threads import available_cpus
from server.thread_tuner import CpuTimes, ThreadTuner, busy_ticks, process_ticks, threads_for
from tests.server.conftest import TEST_MODEL, ServerProcess

PROC_STAT = """cpu  900 0 900 900 0 0 0 0 0 0
cpu0 100 5 50 1000 40 1 2 3 0 0
cpu1 200 0 100 2000 0 0 0 0 7 0
cpu2 400 0 400 9 9 0 0 0 0 0
intr 12345
ctxt 999
"""

needs_two_cpus = pytest.mark.skipif(available_cpus() < 2, reason="needs 2 usable CPUs to choose between 1 and 2")


def test_busy_ticks_count_the_watched_cpus_without_idle_and_iowait() -> None:
    assert busy_ticks(PROC_STAT, {0}) == 100 + 5 + 50 + 1 + 2 + 3
    assert busy_ticks(PROC_STAT, {0, 1}) == 161 + 300  # guest time (7) is inside user already
    assert busy_ticks(PROC_STAT, {5}) == 0


def test_process_ticks_read_utime_and_stime_past_an_odd_command_name() -> None:
    line = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 31 17 0 0 20 0 3 0 12345 1000 100"
    assert process_ticks(line) == 31 + 17


@pytest.mark.parametrize(
    ("cpus", "watched", "others", "threads"),
    [
        (2, 2, 0.0, 2),
        (2, 2, 0.45, 2),
        (2, 2, 0.6, 1),
        (2, 2, 1.0, 1),
        (2, 2, 3.0, 1),
        (8, 8, 2.3, 6),
        (8, 8, 0.0, 8),
        (1, 1, 0.0, 1),
        (2, 64, 20.0, 2),  # a quota of 2 on a busy 64-CPU host: 44 CPUs are free
        (2, 64, 62.7, 1),
    ],
)
def test_threads_are_the_cpus_less_what_others_keep_busy(cpus: int, watched: int, others: float, threads: int) -> None:
    assert threads_for(cpus, watched, others) == threads


def scripted(others: list[float], ticks: int = 100) -> Iterator[CpuTimes]:
    """Readings a second apart in which other processes took `others` CPUs' worth (this process none)."""
    busy, at = 0, 0.0
    yield CpuTimes(busy, 0, at)
    for share in others:
        busy, at = busy + int(share * ticks), at + 1.0
        yield CpuTimes(busy, 0, at)


def test_the_threads_change_only_when_two_readings_in_a_row_agree() -> None:
    readings = scripted([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    applied: list[int] = []
    tuner = ThreadTuner(2, cpu_ids={0, 1}, interval=0.0, set_threads=applied.append, read=lambda: next(readings))
    tuner.ticks_per_second = 100.0
    seen = [tuner.update() for _ in range(8)]
    assert seen == [2, 2, 2, 1, 1, 1, 1, 2]
    assert applied == [1, 2]


@pytest.fixture
def busy_process() -> Iterator[subprocess.Popen]:
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield process
    process.kill()
    process.wait()


def wait_for(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@needs_two_cpus
def test_a_busy_process_takes_a_thread_and_gives_it_back(busy_process: subprocess.Popen) -> None:
    applied: list[int] = []
    tuner = ThreadTuner(2, interval=0.5, set_threads=applied.append)
    assert wait_for(lambda: tuner.update() == 1), f"others measured at {tuner.others:.2f} CPUs"
    busy_process.kill()
    busy_process.wait()
    assert wait_for(lambda: tuner.update() == 2), f"others measured at {tuner.others:.2f} CPUs"
    assert applied == [1, 2]


@needs_two_cpus
def test_the_server_drops_to_one_thread_beside_a_busy_process(relative_checkpoint, busy_process) -> None:
    server = ServerProcess(relative_checkpoint, "--log-level", "info")
    try:
        assert "torch threads: 2 (the CPUs this process may use)" in server.output()  # the choice at start
        assert server.metric("windowlm_torch_threads") == 2
        body = {"model": TEST_MODEL, "prompt": "busy", "max_tokens": 40, "temperature": 0}

        def one_thread() -> bool:  # the engine reads the host between steps: keep it stepping
            httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).raise_for_status()
            return server.metric("windowlm_torch_threads") == 1

        assert wait_for(one_thread, timeout=30)
        assert "torch threads: 2 -> 1" in server.output()
        assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["cpu_threads"] == 1
    finally:
        server.stop()
