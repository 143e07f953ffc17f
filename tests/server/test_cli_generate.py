"""`windowlm generate` as a person runs it: a real process streaming text to stdout."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.sampling import SamplingParams
from model.tokenizer import ByteTokenizer
from tests.generation import tokens_alone
from weights.io import ModelConfig, save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(
        num_tokens=256, max_seq_len=4096, dim=32, depth=2, heads=2, dim_head=16, local_attn_window_size=8
    )
    return save_checkpoint(config.build(), tmp_path_factory.mktemp("ckpt"), config=config)


def windowlm(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "server.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def expected_text(checkpoint: Path, prompt: str, tokens: int, seed: int) -> str:
    from weights.io import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    ids = tokens_alone(model, ByteTokenizer().encode(prompt), SamplingParams(temperature=0.8, seed=seed), tokens)
    return ByteTokenizer().decode(ids)


def test_generate_streams_the_seeded_completion(checkpoint: Path) -> None:
    result = windowlm("generate", "To be", "--weights", str(checkpoint), "--max-tokens", "30", "--seed", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_text(checkpoint, "To be", 30, seed=4) + "\n"


def test_generate_stops_before_a_stop_sequence(checkpoint: Path) -> None:
    full = expected_text(checkpoint, "To be", 60, seed=9)
    stop = next(full[i : i + 2] for i in range(10, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    args = ["--weights", str(checkpoint), "--max-tokens", "60", "--seed", "9", "--stop", stop]
    result = windowlm("generate", "To be", *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout == full[: full.index(stop)] + "\n"


def test_generate_refuses_bad_arguments_clearly(checkpoint: Path) -> None:
    missing = windowlm("generate", "hi", "--weights", str(checkpoint.parent / "absent"))
    assert missing.returncode != 0 and "not a checkpoint folder" in missing.stderr
    bad = windowlm("generate", "hi", "--weights", str(checkpoint), "--top-p", "0")
    assert bad.returncode == 2 and "top_p" in bad.stderr


def test_generate_follows_a_constraint(checkpoint: Path, tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"mood": {"enum": ["glad", "sad"]}}, "required": ["mood"]}')
    common = ["--weights", str(checkpoint), "--max-tokens", "40", "--seed", "2"]
    replies = {
        "json": windowlm("generate", "To be", *common, "--json-schema", f"@{schema}"),
        "regex": windowlm("generate", "To be", *common, "--regex", "[0-9]{3}-[a-z]{2}"),
        "choice": windowlm("generate", "To be", *common, "--choice", "yes", "--choice", "no"),
    }
    assert all(reply.returncode == 0 for reply in replies.values()), [reply.stderr for reply in replies.values()]
    assert replies["json"].stdout in ('{"mood":"glad"}\n', '{"mood":"sad"}\n')  # strict: no other keys
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}\n", replies["regex"].stdout)
    assert replies["choice"].stdout in ("yes\n", "no\n")
    refused = windowlm("generate", "To be", *common, "--regex", "[a-")
    assert refused.returncode == 2 and "unclosed character class" in refused.stderr
    both = windowlm("generate", "To be", *common, "--regex", "a", "--choice", "b")
    assert both.returncode == 2 and "not allowed with" in both.stderr


RUNTIME_ONLY = """
import sys
for name in ("httpx", "openai", "local_attention", "hyper_connections", "hypothesis", "pytest", "transformers",
             "matplotlib"):
    sys.modules[name] = None  # importing a dev or bench package now fails, as in the deployed image
import server.cli, server.app, server.serve
server.cli.build_parser().parse_args(["serve", "--help"])
"""


def test_the_command_line_needs_only_runtime_dependencies() -> None:
    result = subprocess.run([sys.executable, "-c", RUNTIME_ONLY], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: windowlm serve" in result.stdout, result.stderr
