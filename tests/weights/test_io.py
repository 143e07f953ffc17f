"""Checkpoint round trips, and the refusal of every broken checkpoint with a message naming the problem."""

from __future__ import annotations

import inspect
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import LocalTransformer
from model.attention import LocalAttention
from model.chat_template import ChatTemplate
from model.transformer import LocalMHA
from weights.io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Checkpoint,
    CheckpointError,
    ModelConfig,
    chat_template_of,
    load_checkpoint,
    read_config,
    save_checkpoint,
)

TINY = {"num_tokens": 256, "max_seq_len": 64, "dim": 16, "depth": 2, "local_attn_window_size": 4, "dim_head": 8}
CONFIGS = {
    "rotary": {"heads": 2, "num_residual_streams": 1},
    "dynamic_pos_bias": {"heads": 2, "use_dynamic_pos_bias": True, "num_residual_streams": 1},
    "residual_streams": {"heads": 2, "num_residual_streams": 4},
    "no_abs_pos_emb": {"heads": 2, "use_abs_pos_emb": False, "num_residual_streams": 2},
    "xpos_gated_bidirectional": {
        "heads": 2,
        "causal": False,
        "look_forward": 1,
        "use_xpos": True,
        "qk_rmsnorm": True,
        "gate_values_per_head": True,
        "shared_qk": True,
        "exact_windowsize": False,
    },
}


def tiny_model(seed: int = 0, **options) -> tuple[LocalTransformer, ModelConfig]:
    """A tiny model with every parameter perturbed, so zero-initialised parts are tested too."""
    config = ModelConfig(**TINY, **options)
    torch.manual_seed(seed)
    model = config.build()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval(), config


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model, config = tiny_model(**CONFIGS["rotary"])
    return save_checkpoint(model, tmp_path / "ckpt", config=config, training={"corpus": "test"})


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_is_bit_identical(tmp_path: Path, name: str) -> None:
    model, config = tiny_model(**CONFIGS[name])
    training = {"corpus": "enwik8", "steps": 3, "val_bits_per_byte": 1.25}
    directory = save_checkpoint(model, tmp_path / "a" / "b", config=config, training=training)

    loaded, checkpoint = load_checkpoint(directory)
    assert checkpoint == Checkpoint(config=config, tokenizer="bytes", training=training)
    assert not loaded.training
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key, tensor in original.items():
        assert restored[key].dtype == tensor.dtype and torch.equal(restored[key], tensor), key
    tokens = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_save_writes_two_files_and_replaces_an_old_checkpoint(tmp_path: Path) -> None:
    first, config = tiny_model(seed=0, **CONFIGS["rotary"])
    second, _ = tiny_model(seed=1, **CONFIGS["rotary"])
    save_checkpoint(first, tmp_path, config=config)
    save_checkpoint(second, tmp_path, config=config)

    assert sorted(os.listdir(tmp_path)) == [CONFIG_FILE, WEIGHTS_FILE]  # no temporary files left behind
    document = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert (document["format"], document["format_version"], document["tokenizer"]) == ("windowlm", 1, "bytes")
    assert document["model"] == config.to_dict() and document["training"] == {}
    loaded, _ = load_checkpoint(tmp_path)
    assert torch.equal(loaded.token_emb.weight, second.token_emb.weight)


def test_save_refuses_a_model_that_its_config_does_not_describe(tmp_path: Path) -> None:
    model, _ = tiny_model(**CONFIGS["rotary"])
    wrong = ModelConfig(**{**TINY, "depth": 1}, heads=2, num_residual_streams=1)
    with pytest.raises(CheckpointError, match=r"does not match its config: unexpected tensors layers\.1\."):
        save_checkpoint(model, tmp_path, config=wrong)
    with pytest.raises(CheckpointError, match="cannot be written as JSON"):
        save_checkpoint(model, tmp_path, config=ModelConfig(**TINY, heads=2, num_residual_streams=1), training={1j: 0})
    assert not any(tmp_path.iterdir())


def test_bfloat16_load_converts_parameters_and_keeps_buffers_float32(saved: Path) -> None:
    model, _ = load_checkpoint(saved, dtype=torch.bfloat16)
    reference, _ = load_checkpoint(saved)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    assert {buffer.dtype for buffer in model.buffers()} == {torch.float32}  # rotary frequencies stay exact
    assert torch.equal(model.token_emb.weight, reference.token_emb.weight.to(torch.bfloat16))
    assert not model.training
    with torch.no_grad():
        logits = model(torch.arange(9)[None])
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_half_precision_tensors_load_into_float32(tmp_path: Path) -> None:
    model, config = tiny_model(**CONFIGS["rotary"])
    save_checkpoint(model.half(), tmp_path, config=config)
    loaded, _ = load_checkpoint(tmp_path)
    assert loaded.token_emb.weight.dtype == torch.float32
    assert torch.equal(loaded.token_emb.weight, model.token_emb.weight.float())


def test_load_refuses_an_unsupported_dtype(saved: Path) -> None:
    with pytest.raises(CheckpointError, match="dtype must be one of"):
        load_checkpoint(saved, dtype=torch.int8)


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as copies: load_file maps the file, which the corruptions then overwrite."""
    return {name: tensor.clone() for name, tensor in load_file(directory / WEIGHTS_FILE).items()}


def edit_tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        tensors = read_tensors(directory)
        edit(tensors)
        save_file(tensors, directory / WEIGHTS_FILE)

    return apply


def edit_config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        document = json.loads((directory / CONFIG_FILE).read_text())
        edit(document)
        (directory / CONFIG_FILE).write_text(json.dumps(document))

    return apply


def truncate(directory: Path) -> None:
    path = directory / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:-100])


def write_pickle(directory: Path) -> None:
    torch.save(read_tensors(directory), directory / WEIGHTS_FILE)


EMBEDDING = "token_emb.weight"
CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (truncate, r"model\.safetensors: not a readable safetensors file.*not fully covered"),
    "random_bytes": (lambda d: (d / WEIGHTS_FILE).write_bytes(os.urandom(4096)), "not a readable safetensors"),
    "pickle": (write_pickle, "looks like a torch.save / pickle file"),
    "wrong_shape": (
        edit_tensors(lambda t: t.update({EMBEDDING: torch.zeros(255, 16)})),
        r"tensor token_emb\.weight has shape \(255, 16\), expected \(256, 16\)",
    ),
    "extra_key": (
        edit_tensors(lambda t: t.update({"extra.weight": torch.zeros(3)})),
        r"unexpected tensors extra\.weight",
    ),
    "missing_key": (edit_tensors(lambda t: t.pop(EMBEDDING)), r"missing tensors token_emb\.weight"),
    "integer_dtype": (
        edit_tensors(lambda t: t.update({EMBEDDING: t[EMBEDDING].long()})),
        r"token_emb\.weight has dtype torch\.int64, expected one of torch\.float32",
    ),
    "float64": (edit_tensors(lambda t: t.update({EMBEDDING: t[EMBEDDING].double()})), "dtype torch.float64"),
    "missing_weights": (lambda d: (d / WEIGHTS_FILE).unlink(), r"model\.safetensors: no such file"),
    "missing_config": (lambda d: (d / CONFIG_FILE).unlink(), r"config\.json: no such file"),
    "bad_json": (lambda d: (d / CONFIG_FILE).write_text('{"format": "windowlm",'), r"config\.json: not valid JSON"),
    "nan_in_json": (
        lambda d: (d / CONFIG_FILE).write_text((d / CONFIG_FILE).read_text().replace("8.0", "NaN")),
        "NaN is not a JSON number",
    ),
    "not_windowlm": (edit_config(lambda c: c.update({"format": "hf"})), "not a windowlm checkpoint config"),
    "future_version": (edit_config(lambda c: c.update({"format_version": 2})), "unsupported format_version 2"),
    "unknown_top_key": (edit_config(lambda c: c.update({"vocab": 1})), r"unknown keys \['vocab'\]"),
    "unknown_model_key": (
        edit_config(lambda c: c["model"].update({"rotary_base": 1e4})),
        r"model config has unknown keys \['rotary_base'\]",
    ),
    "missing_model_key": (edit_config(lambda c: c["model"].pop("dim")), r"lacks the required keys \['dim'\]"),
    "wrong_type": (edit_config(lambda c: c["model"].update({"dim": "16"})), r"dim must be int, got '16'"),
    "bool_for_int": (edit_config(lambda c: c["model"].update({"depth": True})), "depth must be int, got True"),
    "unknown_tokenizer": (edit_config(lambda c: c.update({"tokenizer": "bpe"})), "unknown tokenizer 'bpe'"),
    "vocab_mismatch": (edit_config(lambda c: c["model"].update({"num_tokens": 300})), "has 256 tokens but"),
    "training_not_object": (edit_config(lambda c: c.update({"training": [1]})), "training must be a JSON object"),
    "unbuildable": (
        edit_config(lambda c: c["model"].update({"use_dynamic_pos_bias": True, "look_backward": 2})),
        "the model config cannot be built: dynamic position bias",
    ),
    "uncompilable_chat_template": (
        edit_config(lambda c: c.update({"chat_template": "{% for m in messages %}\n{{ m.content }"})),
        r"config\.json: chat_template: the chat template does not compile: line 2: ",
    ),
    "chat_template_not_text": (
        edit_config(lambda c: c.update({"chat_template": ["x"]})),
        r"config\.json: chat_template must be a string \(Jinja2 text\), got list",
    ),
    "chat_template_stop_not_a_list": (
        edit_config(lambda c: c.update({"chat_template": "x", "chat_template_stop": "\n"})),
        "chat_template_stop must be a list of non-empty strings",
    ),
    "empty_chat_template_stop": (
        edit_config(lambda c: c.update({"chat_template": "x", "chat_template_stop": [""]})),
        "chat_template_stop must be a list of non-empty strings",
    ),
    "chat_template_stop_alone": (
        edit_config(lambda c: c.update({"chat_template_stop": ["\n"]})),
        "chat_template_stop is given without chat_template",
    ),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_broken_checkpoints_are_refused(saved: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    corrupt, message = CORRUPTIONS[name]
    corrupt(saved)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("the loader must never unpickle")

    for module, function in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, function, no_unpickling)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(saved)


def test_read_config_does_not_touch_the_tensors(saved: Path) -> None:
    (saved / WEIGHTS_FILE).unlink()
    checkpoint = read_config(saved)
    assert checkpoint.training == {"corpus": "test"} and checkpoint.config.heads == 2


def test_config_defaults_are_the_model_defaults() -> None:
    signatures = [inspect.signature(cls.__init__).parameters for cls in (LocalTransformer, LocalMHA, LocalAttention)]
    config = ModelConfig(num_tokens=256, max_seq_len=8, dim=8, depth=1)
    for name, value in config.to_dict().items():
        declared = next(parameters[name].default for parameters in signatures if name in parameters)
        if declared is not inspect.Parameter.empty:
            assert value == declared, name


def test_config_from_dict_round_trips_and_widens_ints_to_floats() -> None:
    config = ModelConfig.from_dict({**TINY, "ff_mult": 2, "xpos_scale_base": 512, "look_forward": None})
    assert isinstance(config.ff_mult, float) and isinstance(config.xpos_scale_base, float)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(CheckpointError, match="heads must be at least 1"):
        ModelConfig.from_dict({**TINY, "heads": 0})
    with pytest.raises(CheckpointError, match="must be a JSON object"):
        ModelConfig.from_dict([1, 2])  # type: ignore[arg-type]


def test_a_chat_template_is_stored_in_config_json_and_read_back(tmp_path: Path) -> None:
    model, config = tiny_model(**CONFIGS["rotary"])
    chat = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}", ("</s>", "\n\n"), "setting")
    folder = save_checkpoint(model, tmp_path / "ckpt", config=config, chat_template=chat)

    document = json.loads((folder / CONFIG_FILE).read_text())
    assert document["chat_template"] == chat.source and document["chat_template_stop"] == ["</s>", "\n\n"]
    _, checkpoint = load_checkpoint(folder)
    expected = ChatTemplate(chat.source, chat.stop, "checkpoint")
    assert checkpoint.chat_template == expected
    assert chat_template_of(folder) == expected and chat_template_of(checkpoint) == expected
    assert chat_template_of(folder).render([{"role": "user", "content": "hi"}]) == "<user>hi"


def test_a_checkpoint_without_a_chat_template_gets_the_default(saved: Path) -> None:
    document = json.loads((saved / CONFIG_FILE).read_text())
    assert "chat_template" not in document and "chat_template_stop" not in document
    assert read_config(saved).chat_template is None
    assert chat_template_of(saved) == ChatTemplate.default()


def test_a_chat_template_without_stops_writes_none(tmp_path: Path) -> None:
    model, config = tiny_model(**CONFIGS["rotary"])
    folder = save_checkpoint(model, tmp_path / "ckpt", config=config, chat_template=ChatTemplate("x", (), "setting"))
    document = json.loads((folder / CONFIG_FILE).read_text())
    assert document["chat_template"] == "x" and "chat_template_stop" not in document
    assert chat_template_of(folder).stop == ()
