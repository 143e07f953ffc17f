"""Start-up failures fail loudly: one line on stderr and a non-zero exit within seconds."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import ServerProcess

# Seconds a failed start may take. The check runs before any model work, but the process start itself (importing
# torch: 3.9 s alone on this project's 2-core machine, idle) is most of it, so the bound leaves room for a busy CI.
EXIT_SECONDS = 10


def serve(*flags: str, timeout: float = 30) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", *flags], capture_output=True, text=True, timeout=timeout
    )
    return done, time.monotonic() - started


def test_a_port_in_use_exits_at_once(relative_checkpoint: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done, seconds = serve("--weights", str(relative_checkpoint), "--port", str(port))
    assert done.returncode == 2 and seconds < EXIT_SECONDS
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (("--max-batch-size", "0"), "max_batch_size"),
        (("--port", "http"), "port"),
        (("--weights", "/nonexistent/folder"), "/nonexistent/folder"),
        (("--api-key-file", "/nonexistent/keys"), "API keys"),
    ],
)
def test_bad_settings_exit_with_one_line(relative_checkpoint: Path, flags: tuple[str, ...], words: str) -> None:
    done, seconds = serve("--weights", str(relative_checkpoint), "--port", "0", *flags)
    assert done.returncode == 2 and seconds < EXIT_SECONDS, done.stderr
    assert words in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_sigterm_on_an_idle_server_exits_cleanly(relative_checkpoint: Path) -> None:
    server = ServerProcess(relative_checkpoint)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(10) == 0
    output = server.output()
    server.stop()
    assert "Traceback" not in output and "Event loop is closed" not in output
    assert "NumPy" not in output  # torch warns "Failed to initialize NumPy" on every start without it


def test_a_server_uses_the_threads_it_is_given_and_says_so(relative_checkpoint: Path) -> None:
    server = ServerProcess(relative_checkpoint, env={"WINDOWLM_THREADS": "1"})
    try:
        assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["cpu_threads"] == 1
    finally:
        server.stop()
    done, _ = serve("--weights", str(relative_checkpoint), "--threads", "0")
    assert done.returncode == 2 and "threads" in done.stderr
