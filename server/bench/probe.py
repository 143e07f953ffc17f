"""Watching the server process of a bench: its RSS, its /metrics gauges, its log, and stopping it."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import IO

SETTLE_SECONDS = 10.0


def rss_mb(pid: int) -> float | None:
    """The resident set size of a process in MiB, from /proc (None where there is no /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


async def sample_rss(pid: int, samples: list[float]) -> None:
    while True:
        if (value := rss_mb(pid)) is not None:
            samples.append(value)
        await asyncio.sleep(1.0)


def gauges(port: int, names: tuple[str, ...]) -> dict[str, float]:
    """Unlabelled gauges from the server's Prometheus text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            values[name] = float(value)
    return values


def settled_gauges(port: int) -> dict[str, float]:
    """The slot and queue gauges once both read 0, or as they are after SETTLE_SECONDS."""
    names = ("windowlm_kv_slots_used", "windowlm_requests_waiting")
    deadline = time.monotonic() + SETTLE_SECONDS
    try:
        values = gauges(port, names)
        while any(values.get(name) != 0 for name in names) and time.monotonic() < deadline:
            time.sleep(0.2)
            values = gauges(port, names)
    except OSError:  # the server is gone: no values
        return {}
    return values


def stop_server(server: subprocess.Popen) -> int:
    """SIGTERM, then wait for the drain; a server that will not stop is killed (and reports -9)."""
    server.send_signal(signal.SIGTERM)
    try:
        return server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
        return server.wait()


def log_tail(log: IO[str], lines: int = 20) -> list[str]:
    log.seek(0)
    return log.read().splitlines()[-lines:]
