"""The image's command line, run here as the container runs it: the Dockerfile's ENTRYPOINT (and CMD) with its
WINDOWLM_* environment, only the weights (a tiny checkpoint) and the port (a free one) changed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.docker import dockerfile
from tests.server.conftest import free_port, make_checkpoint

INSTRUCTIONS = dockerfile.read()
IMAGE_PYTHON = "/opt/venv/bin/python"  # the venv in the image; here, the venv running the tests

pytestmark = pytest.mark.slow


def local(program: str) -> str:
    """A program the image finds on its PATH (the venv's bin), found in this venv."""
    if program == IMAGE_PYTHON:
        return sys.executable
    beside = Path(sys.executable).parent / program
    found = str(beside) if beside.exists() else shutil.which(program)
    if found is None:
        pytest.fail(f"{program} is not installed here: pip install -e .")
    return found


class ImageProcess:
    """The image's command line as a subprocess; `args` are what `docker run IMAGE ARGS...` appends."""

    def __init__(self, weights: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.image_env = {k: v for k, v in dockerfile.env(INSTRUCTIONS).items() if k.startswith("WINDOWLM_")}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("WINDOWLM_")}  # nothing from this shell
        self.env.update(self.image_env)
        self.env.update({"WINDOWLM_WEIGHTS": str(weights), "WINDOWLM_PORT": str(self.port), **(env or {})})
        command = dockerfile.command_line(INSTRUCTIONS)
        self.argv = [local(command[0]), *command[1:], *args]
        self.log = open(weights.parent / f"image-{self.port}.log", "w+")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(self.argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def wait_for(self, path: str, timeout: float = 90) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with {self.process.returncode}: {self.output()}")
            try:
                response = httpx.get(self.url + path, timeout=2)
                if response.status_code == 200:
                    return response
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{path} not 200 after {timeout} s: {self.output()}")

    def stop(self, signal_name: str = "SIGTERM", timeout: float = 10) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(getattr(signal, signal_name))
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                self.log.close()
                return None
        self.log.close()
        return self.process.returncode


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("image") / "ckpt", use_abs_pos_emb=False, max_seq_len=1)


@pytest.fixture
def image(checkpoint: Path) -> Iterator[ImageProcess]:
    process = ImageProcess(checkpoint)
    yield process
    process.stop(signal_name="SIGKILL")


def streamed_text(url: str, model: str) -> str:
    body = {"model": model, "prompt": "ROMEO:", "max_tokens": 12, "temperature": 0.0, "stream": True}
    pieces, done = [], False
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: {"):
                pieces += [choice["text"] for choice in json.loads(line[6:])["choices"]]
    assert done and pieces
    return "".join(pieces)


def test_the_images_command_line_serves_and_drains(image: ImageProcess) -> None:
    """`docker run IMAGE`, here: the server comes up on the image's host, answers /health and a streamed
    completion, the image's HEALTHCHECK command passes, and the image's STOPSIGNAL drains it to exit 0."""
    assert set(image.env.items()) >= {("WINDOWLM_HOST", "0.0.0.0"), ("WINDOWLM_DEVICE", "auto")}
    assert image.wait_for("/health").json() == {"status": "ok"}
    image.wait_for("/ready")
    assert f"at http://0.0.0.0:{image.port}" in image.output()  # the image's WINDOWLM_HOST, read by the server

    model = httpx.get(f"{image.url}/v1/models", timeout=5).json()["data"][0]["id"]
    assert model == "ckpt"  # the weights folder's name, as the bundled model is served as `default`
    assert len(streamed_text(image.url, model)) > 0

    healthcheck = dockerfile.healthcheck_command(INSTRUCTIONS)
    result = subprocess.run(
        [local(healthcheck[0]), *healthcheck[1:]], env=image.env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr

    stop_signal = dockerfile.named(INSTRUCTIONS, "STOPSIGNAL")[-1].args
    started = time.monotonic()
    assert image.stop(stop_signal, timeout=30) == 0, image.output()
    assert time.monotonic() - started < 15  # nothing in flight: the drain ends at once

    broken = subprocess.run(
        [local(healthcheck[0]), *healthcheck[1:]], env=image.env, capture_output=True, text=True, timeout=30
    )
    assert broken.returncode != 0, "the HEALTHCHECK passes with no server"


def test_settings_are_overridden_by_variables_and_appended_arguments(checkpoint: Path) -> None:
    """`docker run -e WINDOWLM_MODEL_NAME=... -e WINDOWLM_MAX_BATCH_SIZE=2 IMAGE --max-batch-size 3`."""
    env = {"WINDOWLM_MODEL_NAME": "renamed", "WINDOWLM_MAX_BATCH_SIZE": "2"}
    process = ImageProcess(checkpoint, "--max-batch-size", "3", env=env)
    try:
        process.wait_for("/ready")
        assert httpx.get(f"{process.url}/v1/models", timeout=5).json()["data"][0]["id"] == "renamed"
        metrics = httpx.get(f"{process.url}/metrics", timeout=5).text
        assert "windowlm_kv_slots_capacity 3.0" in metrics  # the appended flag wins over the variable
        assert len(streamed_text(process.url, "renamed")) > 0
    finally:
        code = process.stop()
    assert code == 0, process.output()
