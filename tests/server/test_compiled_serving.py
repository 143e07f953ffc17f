"""`windowlm serve --compile`: the decode step is compiled before the server is ready, with a progress line per
graph, and the text served is the eager step's. Compiling takes tens of seconds here (less once inductor's disk
cache holds the kernels)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.server.conftest import TEST_MODEL, ServerProcess

pytestmark = pytest.mark.slow

PROMPTS = ["Once upon a time", "To be, or not", "ab", "The quick brown fox jumps over"]


@pytest.fixture(scope="module")
def compiled(relative_checkpoint: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(
        relative_checkpoint, "--compile", "--max-batch-size", "3", "--log-level", "info", ready_timeout=600
    )
    yield process
    process.stop()


def completions(server: ServerProcess, prompts: list[str]) -> list[str]:
    """Greedy completions of every prompt, all sent at once (so they share decode steps)."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

    def one(prompt: str) -> str:
        reply = client.completions.create(model=TEST_MODEL, prompt=prompt, max_tokens=40, temperature=0)
        return reply.choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def test_compiling_is_logged_before_the_server_is_ready(compiled: ServerProcess) -> None:
    log = compiled.output()
    for line in ("compiled decode step 1/3 (batch 1)", "(batches 2-2)", "compiled decode step 3/3 (batch 3)"):
        assert line in log
    assert "decode step compiled in" in log
    assert "AUTOTUNE" not in log  # inductor's kernel timing tables stay out of the server's log


def test_the_compiled_server_serves_the_eager_servers_text(compiled: ServerProcess, server: ServerProcess) -> None:
    """One prompt, three at once (every slot: the all-slots graph) and four (one waits for a slot, batches of
    1 to 3 as requests finish), greedy: the same text as the server without --compile."""
    for prompts in (PROMPTS[:1], PROMPTS[:3], PROMPTS):
        assert completions(compiled, prompts) == completions(server, prompts)
