"""What config.json holds, and its validation: ModelConfig, Checkpoint and the document around them.

config.json describes the model completely, so a checkpoint's model can be built from it alone. Every value
is checked here, before any model is built: unknown or missing keys, wrong types, non-finite numbers and a
tokenizer that does not fit the model raise CheckpointError with a message naming the problem.

    {"format": "windowlm", "format_version": 1,
     "model": {"num_tokens": 256, "max_seq_len": 1024, "dim": 512, "depth": 6, ...},
     "tokenizer": "bytes",
     "training": {"corpus": "...", "steps": 10000, ...},
     "chat_template": "{% for message in messages %}...",   (optional: Jinja2, see model/chat_template.py)
     "chat_template_stop": ["\\n\\n"]}                        (optional, only beside chat_template)

A checkpoint without chat_template is served with ChatTemplate.default(); one whose template does not compile
is refused like any other bad value.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from model import LocalTransformer
from model.chat_template import ChatTemplate, ChatTemplateError
from model.tokenizer import VOCAB_SIZE

FORMAT = "windowlm"
FORMAT_VERSION = 1
TOKENIZER_VOCAB_SIZES = {"bytes": VOCAB_SIZE}  # tokenizer name -> the num_tokens it needs
DOCUMENT_KEYS = {"format", "format_version", "model", "tokenizer", "training", "chat_template", "chat_template_stop"}


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
    """What config.json says: the model, the tokenizer it was trained with, free-form provenance, and the chat
    template the model was trained for (None: it has none, and is served with the default)."""

    config: ModelConfig
    tokenizer: str = "bytes"
    training: dict[str, Any] = field(default_factory=dict)
    chat_template: ChatTemplate | None = None

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
        if self.chat_template is not None and not isinstance(self.chat_template, ChatTemplate):
            raise CheckpointError(f"chat_template must be a ChatTemplate, got {type(self.chat_template).__name__}")

    def to_dict(self) -> dict[str, Any]:
        document = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.config.to_dict(),
            "tokenizer": self.tokenizer,
            "training": self.training,
        }
        if self.chat_template is not None:
            document["chat_template"] = self.chat_template.source
            if self.chat_template.stop:
                document["chat_template_stop"] = list(self.chat_template.stop)
        return document


def decode_config_json(text: str) -> Any:
    """Decode config.json's text strictly: duplicate keys and NaN or Infinity raise ValueError."""
    return json.loads(text, object_pairs_hook=_refuse_duplicate_keys, parse_constant=_refuse_constant)


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"duplicate keys {duplicates}")
    return dict(pairs)


def _refuse_constant(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON number")


def checkpoint_from_document(document: Any) -> Checkpoint:
    """The Checkpoint a decoded config.json describes; anything else in it raises CheckpointError."""
    if not isinstance(document, dict):
        raise CheckpointError(f"must hold a JSON object, got {type(document).__name__}")
    if document.get("format") != FORMAT:
        raise CheckpointError(f"not a windowlm checkpoint config: format is {document.get('format')!r}, not {FORMAT!r}")
    version = document.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise CheckpointError(f"unsupported format_version {version!r}; this windowlm reads version {FORMAT_VERSION}")
    unknown = sorted(set(document) - DOCUMENT_KEYS)
    if unknown:
        raise CheckpointError(f"unknown keys {unknown}; known keys are {sorted(DOCUMENT_KEYS)}")
    for key in ("model", "tokenizer"):
        if key not in document:
            raise CheckpointError(f"lacks the required key {key!r}")
    if not isinstance(document["tokenizer"], str):
        raise CheckpointError(f"tokenizer must be a string, got {document['tokenizer']!r}")
    return Checkpoint(
        config=ModelConfig.from_dict(document["model"]),
        tokenizer=document["tokenizer"],
        training=document.get("training", {}),
        chat_template=_chat_template(document),
    )


def _chat_template(document: dict[str, Any]) -> ChatTemplate | None:
    """The checkpoint's chat template (compiled, so a broken one is refused at load), or None."""
    source, stop = document.get("chat_template"), document.get("chat_template_stop", [])
    if source is None:
        if "chat_template_stop" in document:
            raise CheckpointError("chat_template_stop is given without chat_template")
        return None
    if not isinstance(source, str):
        raise CheckpointError(f"chat_template must be a string (Jinja2 text), got {type(source).__name__}")
    if not isinstance(stop, list) or not all(isinstance(text, str) and text for text in stop):
        raise CheckpointError(f"chat_template_stop must be a list of non-empty strings, got {stop!r}")
    try:
        return ChatTemplate(source, tuple(stop), "checkpoint")
    except ChatTemplateError as error:
        raise CheckpointError(f"chat_template: {error}") from None
