"""Real server processes on free ports, with small checkpoints made for the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from server.config import BUNDLED_WEIGHTS
from weights.io import ModelConfig, save_checkpoint

TEST_MODEL = "tiny"


def free_port() -> int:
    """A loopback port that nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_checkpoint(folder: Path, **overrides) -> Path:
    """A small random model with peaked logits (so greedy choices are far from ties)."""
    torch.manual_seed(0)
    options = dict(num_tokens=256, max_seq_len=64, dim=32, depth=2, heads=2, dim_head=16, local_attn_window_size=8)
    options.update(overrides)
    config = ModelConfig(**options)
    model = config.build()
    with torch.no_grad():
        model.to_logits[1].weight.mul_(30)
    return save_checkpoint(model, folder, config=config)


class ServerProcess:
    """`windowlm serve` in a subprocess, as an operator starts it."""

    def __init__(
        self, weights: Path, *flags: str, env: dict[str, str] | None = None, ready_timeout: float = 60
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        key = flags[flags.index("--api-key") + 1] if "--api-key" in flags else None
        self.headers = {} if key is None else {"Authorization": f"Bearer {key}"}  # what /metrics needs
        command = [sys.executable, "-m", "server.cli", "serve", "--weights", str(weights), "--port", str(self.port)]
        command += ["--model-name", TEST_MODEL, "--log-level", "warning", *flags]
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in stop(); never beside the weights

        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.output()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def metric(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=5).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def wait_metric(self, name: str, expected: float, timeout: float = 30, **labels: str) -> float:
        """The metric once it equals `expected`; the timeout only guards against a hang."""
        deadline = time.monotonic() + timeout
        value = self.metric(name, **labels)
        while value != expected and time.monotonic() < deadline:
            time.sleep(0.02)
            value = self.metric(name, **labels)
        return value

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


@pytest.fixture(scope="session")
def relative_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("relative") / "ckpt", use_abs_pos_emb=False, max_seq_len=1)


@pytest.fixture(scope="session")
def absolute_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("absolute") / "ckpt", max_seq_len=64)


@pytest.fixture(scope="module")
def server(relative_checkpoint: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(relative_checkpoint, "--max-batch-size", "16", "--max-queue", "32", "--max-n", "4")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def bundled() -> Iterator[ServerProcess]:
    """The bundled model (weights/default), served as `windowlm serve` serves it by default."""
    process = ServerProcess(BUNDLED_WEIGHTS)
    yield process
    process.stop()
