"""`windowlm convert --from-local-attention`: a local-attention state dict + its arguments -> a windowlm checkpoint.

Our LocalTransformer has the reference's parameter names and shapes, so conversion is a strict load of the
state dict into a model built from the arguments, then weights.io.save_checkpoint. The .pt file is the only
pickle windowlm ever reads, and only through torch.load(weights_only=True), which builds tensors and plain
containers and refuses to run anything else a pickle may ask for.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.chat_template import ChatTemplate
from weights.checkpoint_config import CheckpointError, ModelConfig
from weights.checkpoint_tensors import listed, tensor_problems
from weights.io import add_chat_template_arguments, chat_template_from_args, save_checkpoint

__all__ = [
    "ConvertError",
    "add_convert_arguments",
    "convert_local_attention",
    "read_arguments",
    "read_state_dict",
    "run_convert",
]


TORCH_SAVE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; a bare pickle (protocol >= 2)


class ConvertError(ValueError):
    """A source checkpoint or argument file that cannot be converted."""


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The state dict saved at `path` with torch.save(model.state_dict(), path), read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    with open(path, "rb") as file:
        start = file.read(4)
    if not start.startswith(TORCH_SAVE_MAGIC):
        raise ConvertError(f"{path}: not a torch.save file (it starts with {start!r})")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged pickle fails in many ways (KeyError, struct.error, ...); none runs code
        raise ConvertError(
            f"{path}: not a state dict that torch.load(weights_only=True) can read: {_load_failure(error)}"
        ) from error
    return _as_state_dict(loaded, path)


def _load_failure(error: Exception) -> str:
    """The reason in torch.load's error, without its advice to load untrusted files unsafely."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return f"it holds a pickled {refused[1]}, not only tensors (save model.state_dict() instead)"
    reason = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if reason:
        return reason[1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _as_state_dict(loaded: Any, path: Path) -> dict[str, Tensor]:
    if not isinstance(loaded, Mapping):
        raise ConvertError(f"{path}: holds a {type(loaded).__name__}, not a state dict (a mapping name -> tensor)")
    not_tensors = [str(name) for name, value in loaded.items() if not isinstance(value, Tensor)]
    if not_tensors:
        hint = ""
        if any(isinstance(value, Mapping) for value in loaded.values()):
            hint = "; it looks like a training checkpoint: save model.state_dict() itself"
        raise ConvertError(f"{path}: not a state dict: {listed(not_tensors)} are not tensors{hint}")
    return {str(name): tensor for name, tensor in loaded.items()}


def read_arguments(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object of LocalTransformer keyword arguments at `path`."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ConvertError(f"{path}: no such file") from error
    except (OSError, UnicodeDecodeError) as error:
        raise ConvertError(f"{path}: cannot be read: {error}") from error
    except ValueError as error:
        raise ConvertError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(document, dict):
        raise ConvertError(f"{path}: must hold a JSON object of LocalTransformer arguments")
    return document


def model_config(arguments: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of the reference model built with `arguments` (LocalTransformer keyword arguments)."""
    known = [field.name for field in dataclasses.fields(ModelConfig)]
    unknown = sorted(set(arguments) - set(known))
    if unknown:
        raise ConvertError(
            f"unknown LocalTransformer arguments {unknown}; windowlm converts models described by {known} "
            "(global attention layers are modules and cannot be converted)"
        )
    if arguments.get("use_abs_pos_emb", True) is not True:
        raise ConvertError("local-attention models always have an absolute position embedding: use_abs_pos_emb")
    try:
        return ModelConfig.from_dict(arguments)
    except CheckpointError as error:
        raise ConvertError(str(error)) from error


def convert_local_attention(
    state_dict: dict[str, Tensor],
    kwargs: dict[str, Any],
    out: str | os.PathLike[str],
    *,
    source: str | None = None,
    chat_template: ChatTemplate | None = None,
) -> Path:
    """Write the local-attention model (`state_dict`, built with `kwargs`) as a windowlm checkpoint in `out`,
    with `chat_template` in its config.json when given."""
    config = model_config(kwargs)
    try:
        model = config.build()
    except (ValueError, TypeError) as error:
        raise ConvertError(f"the arguments do not build a LocalTransformer: {error}") from error
    problems = tensor_problems(model.state_dict(), state_dict)
    if problems:
        raise ConvertError("the state dict does not match the arguments: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)
    training = {"converted_from": "local-attention"}
    if source is not None:
        training["source"] = source
    return save_checkpoint(model.eval(), out, config=config, training=training, chat_template=chat_template)


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `windowlm convert`."""
    parser.add_argument(
        "--from-local-attention",
        required=True,
        metavar="CKPT.pt",
        help="a state dict saved with torch.save(model.state_dict(), ...) from local_attention.LocalTransformer",
    )
    parser.add_argument(
        "--config", required=True, metavar="ARGS.json", help="the keyword arguments the model was built with"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder to write")
    add_chat_template_arguments(parser)


def run_convert(args: argparse.Namespace) -> int:
    """`windowlm convert`; returns the exit code (2 with a message on stderr when it refuses)."""
    source = args.from_local_attention
    try:
        chat_template = chat_template_from_args(args)
        arguments = read_arguments(args.config)
        state_dict = read_state_dict(source)
        out = convert_local_attention(state_dict, arguments, args.out, source=str(source), chat_template=chat_template)
    except (ConvertError, CheckpointError) as error:
        print(f"windowlm convert: {error}", file=sys.stderr)
        return 2
    print(f"windowlm convert: wrote {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights.convert", description=__doc__.splitlines()[0])
    add_convert_arguments(parser)
    return run_convert(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
