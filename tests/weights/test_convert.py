"""Conversion of local-attention state dicts: equal logits, and clear refusals of anything else."""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import local_attention
import pytest
import torch

from model.chat_template import ChatTemplate
from tests.model.helpers import randomize_
from weights.convert import add_convert_arguments, convert_local_attention, run_convert
from weights.io import chat_template_of, load_checkpoint, read_config

TINY = {"num_tokens": 256, "max_seq_len": 48, "dim": 16, "depth": 2, "local_attn_window_size": 8, "dim_head": 8}
CONFIGS = {
    "defaults": {"heads": 2},  # rotary, four hyper-connection residual streams
    "dynamic_pos_bias": {"heads": 2, "use_dynamic_pos_bias": True, "num_residual_streams": 1},
    "xpos_qk_norm_gates": {
        "heads": 2,
        "use_xpos": True,
        "qk_rmsnorm": True,
        "gate_values_per_head": True,
        "num_residual_streams": 2,
    },
    "bidirectional_shared_qk": {"heads": 2, "causal": False, "look_forward": 1, "shared_qk": True},
}


def reference_model(seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_(local_attention.LocalTransformer(**kwargs), seed).eval()


def save_reference(folder: Path, kwargs: dict, seed: int = 0) -> tuple[torch.nn.Module, Path, Path]:
    """A random reference model, its state dict saved with torch.save and its arguments as JSON."""
    reference = reference_model(seed, **kwargs)
    checkpoint, arguments = folder / "reference.pt", folder / "args.json"
    torch.save(reference.state_dict(), checkpoint)
    arguments.write_text(json.dumps(kwargs))
    return reference, checkpoint, arguments


def convert(checkpoint: Path, arguments: Path, out: Path, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    args = ["--from-local-attention", str(checkpoint), "--config", str(arguments), "--out", str(out), *extra]
    return run_convert(parser.parse_args(args))


@pytest.mark.parametrize("name", CONFIGS)
def test_converted_logits_equal_the_reference(tmp_path: Path, name: str) -> None:
    kwargs = {**TINY, **CONFIGS[name]}
    reference, checkpoint, arguments = save_reference(tmp_path, kwargs)
    assert convert(checkpoint, arguments, tmp_path / "out") == 0

    model, saved = load_checkpoint(tmp_path / "out")
    assert saved.training == {"converted_from": "local-attention", "source": str(checkpoint)}
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), atol=1e-5, rtol=0)


def test_the_plain_function_converts_a_state_dict(tmp_path: Path) -> None:
    kwargs = {**TINY, "heads": 2, "num_residual_streams": 1}
    reference = reference_model(3, **kwargs)
    out = convert_local_attention(reference.state_dict(), kwargs, tmp_path / "out")
    assert read_config(out).config.num_residual_streams == 1
    model, _ = load_checkpoint(out)
    tokens = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), atol=1e-5, rtol=0)


def refusal(tmp_path: Path, capsys: pytest.CaptureFixture[str], checkpoint: Path, arguments: Path) -> str:
    """Convert, expect exit code 2 and no checkpoint written, and return the message on stderr."""
    out = tmp_path / "out"
    assert convert(checkpoint, arguments, out) == 2
    assert not (out / "config.json").exists()
    error = capsys.readouterr().err
    assert error.startswith("windowlm convert: ")
    return error


def test_unknown_arguments_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, checkpoint, arguments = save_reference(tmp_path, {**TINY, "heads": 2})
    arguments.write_text(json.dumps({**TINY, "heads": 2, "global_attn_layer": None, "rotary_base": 10}))
    error = refusal(tmp_path, capsys, checkpoint, arguments)
    assert "['global_attn_layer', 'rotary_base']" in error


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        (json.dumps({**TINY, "heads": "two"}), "heads must be int"),
        (json.dumps({**TINY, "use_abs_pos_emb": False}), "always have an absolute position embedding"),
    ],
)
def test_bad_argument_files_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, expected: str
) -> None:
    _, checkpoint, arguments = save_reference(tmp_path, {**TINY, "heads": 2})
    arguments.write_text(content)
    assert expected in refusal(tmp_path, capsys, checkpoint, arguments)


def test_a_state_dict_of_another_shape_names_the_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, checkpoint, arguments = save_reference(tmp_path, {**TINY, "heads": 2, "depth": 3})
    arguments.write_text(json.dumps({**TINY, "heads": 2, "depth": 2}))
    assert "unexpected tensors layers.2." in refusal(tmp_path, capsys, checkpoint, arguments)

    _, checkpoint, arguments = save_reference(tmp_path, {**TINY, "heads": 2})
    state = torch.load(checkpoint, weights_only=True)
    del state["to_logits.1.weight"]
    state["token_emb.weight"] = torch.zeros(256, 32)
    torch.save(state, checkpoint)
    error = refusal(tmp_path, capsys, checkpoint, arguments)
    assert "missing tensors to_logits.1.weight" in error
    assert "tensor token_emb.weight has shape (256, 32), expected (256, 16)" in error


def test_a_training_checkpoint_is_not_a_state_dict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reference, checkpoint, arguments = save_reference(tmp_path, {**TINY, "heads": 2})
    torch.save({"model": reference.state_dict(), "epoch": 3}, checkpoint)
    error = refusal(tmp_path, capsys, checkpoint, arguments)
    assert "model, epoch are not tensors" in error and "save model.state_dict() itself" in error

    torch.save([torch.zeros(2)], checkpoint)
    assert "holds a list, not a state dict" in refusal(tmp_path, capsys, checkpoint, arguments)


class Payload:
    """A pickle that would create a file if it were ever unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_that_runs_code_is_refused_without_running_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, checkpoint, arguments = save_reference(tmp_path, {**TINY, "heads": 2})
    marker = tmp_path / "ran"
    checkpoint.write_bytes(pickle.dumps({"weight": Payload(marker)}))
    assert "torch.load(weights_only=True) can read" in refusal(tmp_path, capsys, checkpoint, arguments)
    assert not marker.exists()


def test_missing_and_broken_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, checkpoint, arguments = save_reference(tmp_path, {**TINY, "heads": 2})
    assert "missing.pt: no such file" in refusal(tmp_path, capsys, tmp_path / "missing.pt", arguments)
    assert "missing.json: no such file" in refusal(tmp_path, capsys, checkpoint, tmp_path / "missing.json")
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    assert "can read" in refusal(tmp_path, capsys, checkpoint, arguments)
    checkpoint.write_text("hello")
    assert "not a torch.save file (it starts with b'hell')" in refusal(tmp_path, capsys, checkpoint, arguments)


def test_a_whole_pickled_model_is_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reference, checkpoint, arguments = save_reference(tmp_path, {**TINY, "heads": 2})
    torch.save(reference, checkpoint)
    error = refusal(tmp_path, capsys, checkpoint, arguments)
    assert "holds a pickled local_attention.transformer.LocalTransformer" in error
    assert "save model.state_dict() instead" in error


CHAT = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}<|assistant|>"


def test_convert_stores_the_chat_template_and_its_stops(tmp_path: Path) -> None:
    _, checkpoint, arguments = save_reference(tmp_path, {**TINY, "heads": 2})
    (tmp_path / "chat.jinja").write_text(CHAT, encoding="utf-8")
    stops = ["--chat-template-stop", "<|end|>", "--chat-template-stop", "\n\n"]
    assert (
        convert(checkpoint, arguments, tmp_path / "out", "--chat-template", str(tmp_path / "chat.jinja"), *stops) == 0
    )
    document = json.loads((tmp_path / "out" / "config.json").read_text())
    assert document["chat_template"] == CHAT and document["chat_template_stop"] == ["<|end|>", "\n\n"]
    assert chat_template_of(tmp_path / "out") == ChatTemplate(CHAT, ("<|end|>", "\n\n"), "checkpoint")

    assert convert(checkpoint, arguments, tmp_path / "plain") == 0
    assert chat_template_of(tmp_path / "plain") == ChatTemplate.default()


def test_the_plain_function_takes_a_chat_template(tmp_path: Path) -> None:
    kwargs = {**TINY, "heads": 2}
    chat = ChatTemplate(CHAT, (), "setting")
    out = convert_local_attention(reference_model(**kwargs).state_dict(), kwargs, tmp_path / "out", chat_template=chat)
    assert read_config(out).chat_template == ChatTemplate(CHAT, (), "checkpoint")


def test_a_chat_template_that_cannot_be_used_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, checkpoint, arguments = save_reference(tmp_path, {**TINY, "heads": 2})
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}", encoding="utf-8")
    for extra, message in [
        (["--chat-template", str(broken)], f"--chat-template: chat template file {broken}: the chat template does not"),
        (["--chat-template", str(tmp_path / "nowhere.jinja")], "nowhere.jinja: cannot be read: No such file"),
        (["--chat-template-stop", "<|end|>"], "--chat-template-stop needs --chat-template"),
    ]:
        assert convert(checkpoint, arguments, tmp_path / "out", *extra) == 2
        assert not (tmp_path / "out").exists()
        error = capsys.readouterr().err
        assert error.startswith("windowlm convert: ") and message in error and error.count("\n") == 1
