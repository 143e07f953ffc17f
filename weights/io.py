"""Reading and writing windowlm checkpoints: a folder with config.json and model.safetensors.

config.json describes the model completely, so loading builds a LocalTransformer from it and loads the
tensors strictly: every tensor named, shaped and typed as the model expects, nothing missing or extra.
Tensors are read only with safetensors, which never unpickles; a checkpoint that fails any check raises
CheckpointError before a single tensor reaches the model, so no half-loaded model escapes.

    {"format": "windowlm", "format_version": 1,
     "model": {"num_tokens": 256, "max_seq_len": 1024, "dim": 512, "depth": 6, ...},
     "tokenizer": "bytes",
     "training": {"corpus": "...", "steps": 10000, ...}}
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from model import LocalTransformer
from model.tokenizer import VOCAB_SIZE

FORMAT = "windowlm"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_VOCAB_SIZES = {"bytes": VOCAB_SIZE}  # tokenizer name -> the num_tokens it needs
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # stored floats we accept, and load into
_FOLDER_HOLDS = f"a checkpoint folder holds {CONFIG_FILE} and {WEIGHTS_FILE}"
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; a bare pickle (protocol >= 2)


class CheckpointError(ValueError):
    """A checkpoint (or a model and config about to be saved as one) that windowlm refuses."""


@dataclass
class ModelConfig:
    """Every JSON-describable LocalTransformer argument; defaults are LocalTransformer's.

    The last seven fields are LocalMHA / LocalAttention options LocalTransformer passes through **kwargs;
    None for look_forward and exact_windowsize means "the model's default" and is not passed on.
    A global attention layer is a module, not JSON, so such models cannot be described here.
    """

    num_tokens: int | None
    max_seq_len: int
    dim: int
    depth: int
    causal: bool = True
    local_attn_window_size: int = 512
    dim_head: int = 64
    heads: int = 8
    ff_mult: float = 4.0
    attn_dropout: float = 0.0
    ff_dropout: float = 0.0
    ignore_index: int = -1
    use_xpos: bool = False
    xpos_scale_base: float | None = None
    use_dynamic_pos_bias: bool = False
    num_residual_streams: int = 4
    use_abs_pos_emb: bool = True
    look_backward: int = 1
    look_forward: int | None = None
    exact_windowsize: bool | None = None
    shared_qk: bool = False
    qk_rmsnorm: bool = False
    qk_scale: float = 8.0
    gate_values_per_head: bool = False

    def __post_init__(self) -> None:
        for name, hint in _field_types().items():
            setattr(self, name, _checked(name, getattr(self, name), hint))
        for name in ("max_seq_len", "dim", "depth", "local_attn_window_size", "dim_head", "heads"):
            if getattr(self, name) < 1:
                raise CheckpointError(f"model config: {name} must be at least 1, got {getattr(self, name)}")
        if self.num_tokens is not None and self.num_tokens < 1:
            raise CheckpointError(f"model config: num_tokens must be at least 1 or null, got {self.num_tokens}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a JSON object, refusing unknown keys, missing required keys and wrong types."""
        if not isinstance(values, dict):
            raise CheckpointError(f"model config must be a JSON object, got {type(values).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise CheckpointError(f"model config has unknown keys {unknown}; known keys are {sorted(fields)}")
        required = [name for name, f in fields.items() if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in values]
        if missing:
            raise CheckpointError(f"model config lacks the required keys {missing}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def build(self) -> LocalTransformer:
        """A freshly initialised LocalTransformer; build under `with torch.device(...)` to place it."""
        arguments = self.to_dict()
        for name in ("look_forward", "exact_windowsize"):  # LocalTransformer reads these from **kwargs
            if arguments[name] is None:
                del arguments[name]
        return LocalTransformer(**arguments)


@functools.cache
def _field_types() -> dict[str, Any]:
    """ModelConfig's field types, resolved from their string annotations."""
    return typing.get_type_hints(ModelConfig)


def _checked(name: str, value: Any, hint: Any) -> Any:
    """value if it has the type `hint` (int, float, bool, or one of them | None); ints become floats."""
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return value
    if bool in allowed and isinstance(value, bool):
        return value
    if int in allowed and isinstance(value, int) and not isinstance(value, bool):
        return value
    if float in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise CheckpointError(f"model config: {name} must be finite, got {value}")
        return float(value)
    expected = " or ".join("null" if kind is type(None) else kind.__name__ for kind in allowed)
    raise CheckpointError(f"model config: {name} must be {expected}, got {value!r} ({type(value).__name__})")


@dataclass
class Checkpoint:
    """What config.json says: the model, the tokenizer it was trained with, and free-form provenance."""

    config: ModelConfig
    tokenizer: str = "bytes"
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tokenizer not in TOKENIZER_VOCAB_SIZES:
            raise CheckpointError(f"unknown tokenizer {self.tokenizer!r}; known: {sorted(TOKENIZER_VOCAB_SIZES)}")
        vocab_size = TOKENIZER_VOCAB_SIZES[self.tokenizer]
        if self.config.num_tokens != vocab_size:
            raise CheckpointError(
                f"tokenizer {self.tokenizer!r} has {vocab_size} tokens but the model has num_tokens "
                f"{self.config.num_tokens}"
            )
        if not isinstance(self.training, dict):
            raise CheckpointError(f"training must be a JSON object, got {type(self.training).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.config.to_dict(),
            "tokenizer": self.tokenizer,
            "training": self.training,
        }


def save_checkpoint(
    model: LocalTransformer,
    directory: str | os.PathLike[str],
    *,
    config: ModelConfig,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as a checkpoint in `directory` (created if needed) and return the directory.

    `config` must be the one the model was built from: the model's tensors are checked against a model
    built from it (on the meta device, so no memory is spent), so what is saved always loads. Each file
    is written under a temporary name and renamed into place, weights first, so a reader never sees a
    torn file.
    """
    directory = Path(directory)
    checkpoint = Checkpoint(config=config, training={} if training is None else training)
    try:
        document = json.dumps(checkpoint.to_dict(), indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"training provenance cannot be written as JSON: {error}") from error

    with torch.device("meta"):
        expected = config.build().state_dict()
    tensors = _tensors_to_save(model)
    problems = _tensor_problems(expected, tensors)
    if problems:
        raise CheckpointError("the model does not match its config: " + "; ".join(problems))

    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / WEIGHTS_FILE, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    write_atomically(directory / CONFIG_FILE, lambda path: path.write_text(document, encoding="utf-8"))
    return directory


def _tensors_to_save(model: torch.nn.Module) -> dict[str, Tensor]:
    """The state dict on the CPU, contiguous, with tensors that share storage cloned (safetensors refuses)."""
    tensors: dict[str, Tensor] = {}
    storages: set[int] = set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    return tensors


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
        document = json.loads(text, object_pairs_hook=_refuse_duplicate_keys, parse_constant=_refuse_constant)
    except ValueError as error:
        raise CheckpointError(f"{path}: not valid JSON: {error}") from error
    try:
        return _parse_document(document)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from error


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"duplicate keys {duplicates}")
    return dict(pairs)


def _refuse_constant(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON number")


def _parse_document(document: Any) -> Checkpoint:
    if not isinstance(document, dict):
        raise CheckpointError(f"must hold a JSON object, got {type(document).__name__}")
    if document.get("format") != FORMAT:
        raise CheckpointError(f"not a windowlm checkpoint config: format is {document.get('format')!r}, not {FORMAT!r}")
    version = document.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise CheckpointError(f"unsupported format_version {version!r}; this windowlm reads version {FORMAT_VERSION}")
    known = {"format", "format_version", "model", "tokenizer", "training"}
    unknown = sorted(set(document) - known)
    if unknown:
        raise CheckpointError(f"unknown keys {unknown}; known keys are {sorted(known)}")
    for key in ("model", "tokenizer"):
        if key not in document:
            raise CheckpointError(f"lacks the required key {key!r}")
    if not isinstance(document["tokenizer"], str):
        raise CheckpointError(f"tokenizer must be a string, got {document['tokenizer']!r}")
    return Checkpoint(
        config=ModelConfig.from_dict(document["model"]),
        tokenizer=document["tokenizer"],
        training=document.get("training", {}),
    )


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
    problems = _tensor_problems(model.state_dict(), tensors)
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


def _tensor_problems(expected: dict[str, Tensor], found: dict[str, Tensor]) -> list[str]:
    """What keeps `found` from loading strictly into a model whose state dict is `expected`."""
    problems = []
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    if missing:
        problems.append(f"missing tensors {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_listed(unexpected)}")
    for name in sorted(expected.keys() & found.keys()):
        want, have = expected[name], found[name]
        if have.shape != want.shape:
            problems.append(f"tensor {name} has shape {tuple(have.shape)}, expected {tuple(want.shape)}")
        if want.is_floating_point() and have.dtype not in FLOAT_DTYPES:
            accepted = ", ".join(str(dtype) for dtype in FLOAT_DTYPES)
            problems.append(f"tensor {name} has dtype {have.dtype}, expected one of {accepted}")
        elif not want.is_floating_point() and have.dtype != want.dtype:
            problems.append(f"tensor {name} has dtype {have.dtype}, expected {want.dtype}")
    return problems


def _listed(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
