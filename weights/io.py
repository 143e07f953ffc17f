"""Reading and writing windowlm checkpoints: a folder with config.json and model.safetensors.

Loading builds a LocalTransformer from config.json (weights/checkpoint_config.py) and loads the tensors
strictly (weights/checkpoint_tensors.py). Tensors are read only with safetensors, which never unpickles; a
checkpoint that fails any check raises CheckpointError before a single tensor reaches the model, so no
half-loaded model escapes. Writing renames each finished file into place, so a reader never sees a torn one.

CheckpointError, Checkpoint and ModelConfig are importable from here too: they are this module's interface. So is
the checkpoint's chat template (chat_template_of), and the `--chat-template` flags with which `windowlm train`
and `windowlm convert` store one in the config.json they write.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from model import LocalTransformer
from model.chat_template import ChatTemplate, ChatTemplateError
from weights.checkpoint_config import (
    Checkpoint,
    CheckpointError,
    ModelConfig,
    checkpoint_from_document,
    decode_config_json,
)
from weights.checkpoint_tensors import FLOAT_DTYPES, tensor_problems, tensors_to_save

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "Checkpoint",
    "CheckpointError",
    "ModelConfig",
    "add_chat_template_arguments",
    "chat_template_from_args",
    "chat_template_of",
    "load_checkpoint",
    "read_config",
    "save_checkpoint",
    "write_atomically",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_FOLDER_HOLDS = f"a checkpoint folder holds {CONFIG_FILE} and {WEIGHTS_FILE}"
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; a bare pickle (protocol >= 2)


def save_checkpoint(
    model: LocalTransformer,
    directory: str | os.PathLike[str],
    *,
    config: ModelConfig,
    training: dict[str, Any] | None = None,
    chat_template: ChatTemplate | None = None,
) -> Path:
    """Write `model` as a checkpoint in `directory` (created if needed) and return the directory.

    `config` must be the one the model was built from: the model's tensors are checked against a model
    built from it (on the meta device, so no memory is spent), so what is saved always loads. Each file
    is written under a temporary name and renamed into place, weights first, so a reader never sees a
    torn file. `chat_template` (its source and stop strings) is stored in config.json when given.
    """
    directory = Path(directory)
    checkpoint = Checkpoint(config=config, training={} if training is None else training, chat_template=chat_template)
    try:
        document = json.dumps(checkpoint.to_dict(), indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"training provenance cannot be written as JSON: {error}") from error

    with torch.device("meta"):
        expected = config.build().state_dict()
    tensors = tensors_to_save(model)
    problems = tensor_problems(expected, tensors)
    if problems:
        raise CheckpointError("the model does not match its config: " + "; ".join(problems))

    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / WEIGHTS_FILE, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    write_atomically(directory / CONFIG_FILE, lambda path: path.write_text(document, encoding="utf-8"))
    return directory


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Write a file through `write(temporary_path)`, flush it to disk, then rename it to `path`: a reader sees
    the old file or the whole new one, never a part."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        write(temporary_path)
        with open(temporary_path, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temporary_path, 0o666 & ~_umask())  # mkstemp makes the file private; a checkpoint is not
        os.replace(temporary_path, path)
    finally:
        temporary_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_config(directory: str | os.PathLike[str]) -> Checkpoint:
    """Read and validate config.json of the checkpoint in `directory`; the tensors are not touched."""
    path = Path(directory) / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise CheckpointError(f"{path}: no such file; {_FOLDER_HOLDS}") from error
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: cannot be read: {error}") from error
    try:
        document = decode_config_json(text)
    except ValueError as error:
        raise CheckpointError(f"{path}: not valid JSON: {error}") from error
    try:
        return checkpoint_from_document(document)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from error


def load_checkpoint(
    directory: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[LocalTransformer, Checkpoint]:
    """Build the model config.json describes on `device`, load model.safetensors strictly, return it in eval mode.

    Parameters are converted to `dtype` (float32 when None); buffers such as the rotary frequencies stay
    float32, since in half precision they would shift the rotation angles of distant positions.
    """
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"dtype must be one of {[str(d) for d in FLOAT_DTYPES]} or None, got {dtype}")
    checkpoint = read_config(directory)
    config_path = Path(directory) / CONFIG_FILE
    try:
        with torch.device(device):
            model = checkpoint.config.build()
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{config_path}: the model config cannot be built: {error}") from error

    weights_path = Path(directory) / WEIGHTS_FILE
    tensors = _read_tensors(weights_path)
    problems = tensor_problems(model.state_dict(), tensors)
    if problems:
        raise CheckpointError(f"{weights_path}: does not match {CONFIG_FILE}: " + "; ".join(problems))
    model.load_state_dict(tensors, strict=True)

    if dtype is not None:
        for parameter in model.parameters():
            parameter.data = parameter.data.to(dtype)
    return model.eval(), checkpoint


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file, on the CPU; anything else (a pickle, a torn file) is refused."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; {_FOLDER_HOLDS}")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        with open(path, "rb") as file:
            start = file.read(4)
        hint = ""
        if start.startswith(_PICKLE_MAGIC):
            hint = " (it looks like a torch.save / pickle file, which windowlm never loads)"
        raise CheckpointError(f"{path}: not a readable safetensors file{hint}: {error}") from error


def chat_template_of(checkpoint_or_folder: Checkpoint | str | os.PathLike[str]) -> ChatTemplate:
    """The chat template of a checkpoint (read from its folder's config.json when given a folder): its own,
    with origin "checkpoint", else ChatTemplate.default(). A folder whose template does not compile raises
    CheckpointError naming its config.json."""
    checkpoint = checkpoint_or_folder
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = read_config(checkpoint)
    return checkpoint.chat_template or ChatTemplate.default()


def add_chat_template_arguments(parser: argparse.ArgumentParser) -> None:
    """`--chat-template FILE` and `--chat-template-stop TEXT` of `windowlm train` and `windowlm convert`."""
    parser.add_argument(
        "--chat-template",
        metavar="FILE",
        help="Jinja2 chat template to store in config.json (default: none; served with windowlm's default)",
    )
    parser.add_argument(
        "--chat-template-stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="a stop string that ends the model's turn under --chat-template (repeatable; taken literally)",
    )


def chat_template_from_args(args: argparse.Namespace) -> ChatTemplate | None:
    """The template --chat-template names, with its --chat-template-stop strings; None when not given.
    Raises CheckpointError with a one-line message naming the file when it cannot be read or compiled."""
    if args.chat_template is None:
        if args.chat_template_stop:
            raise CheckpointError("--chat-template-stop needs --chat-template")
        return None
    try:
        return ChatTemplate.from_file(args.chat_template, args.chat_template_stop, "checkpoint")
    except ChatTemplateError as error:
        raise CheckpointError(f"--chat-template: {error}") from None
