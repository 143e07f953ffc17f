"""The bundled model: it loads, its recorded held-out figure is true, and it writes recognisable English."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.sampling import SamplingParams
from model.tokenizer import ByteTokenizer
from tests.generation import tokens_alone
from weights.data import shakespeare_corpus
from weights.evaluate import evaluate_bits_per_byte
from weights.io import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "weights" / "default"


@pytest.fixture(scope="module")
def bundled():
    model, checkpoint = load_checkpoint(DEFAULT)
    return model, checkpoint


def test_bundled_model_is_small_relative_and_documented(bundled) -> None:
    model, checkpoint = bundled
    assert (DEFAULT / "model.safetensors").stat().st_size <= 25 * 2**20
    assert not model.use_abs_pos_emb  # streams without a length limit
    assert checkpoint.tokenizer == "bytes"
    card = (DEFAULT / "MODEL_CARD.md").read_text()
    recorded = checkpoint.training["validation"]["bits_per_byte"]
    assert f"{recorded:.3f}" in card or f"{recorded:.2f}" in card
    assert recorded <= 2.2


@pytest.mark.slow
def test_recorded_held_out_bits_per_byte_match_a_fresh_evaluation(bundled, shakespeare_folder: Path) -> None:
    model, checkpoint = bundled
    record = checkpoint.training
    corpus = shakespeare_corpus(shakespeare_folder, held_out=record["held_out_works"])
    assert corpus.fingerprint() == record["corpus_sha256"]
    fresh = evaluate_bits_per_byte(model, corpus.validation, record["validation"]["seq_len"])
    assert abs(fresh - record["validation"]["bits_per_byte"]) <= 0.02


def test_bundled_model_writes_english_words(bundled) -> None:
    model, _ = bundled
    tokenizer = ByteTokenizer()
    ids = tokens_alone(model, tokenizer.encode("ROMEO:\n"), SamplingParams(temperature=0.5, seed=0), 300)
    words = tokenizer.decode(list(ids)).lower().split()
    common = {"the", "and", "i", "to", "of", "my", "you", "a", "that", "is", "in", "not", "me", "with", "it"}
    assert sum(word.strip(",.;:!?'") in common for word in words) >= len(words) // 5
