"""Server settings: one pydantic-settings class, read from WINDOWLM_* variables and overridden by CLI flags.

The command line derives its `windowlm serve` flags from this class (`add_settings_arguments`), so a setting is
declared once, here. Every limit on what a client controls is a setting with a safe default.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

BUNDLED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "default"
MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WINDOWLM_", extra="forbid")

    weights: Path = Field(BUNDLED_WEIGHTS, description="checkpoint folder (config.json + model.safetensors)")
    model_name: str | None = Field(None, description="model id in the API (default: the checkpoint folder's name)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU"
    )
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads (default: the CPUs this process may use: affinity, cgroup quota)"
    )
    max_batch_size: int = Field(32, ge=1, description="KV cache slots: sequences decoded together")
    max_queue: int = Field(256, ge=0, description="sequences waiting for a slot before new requests get 429")
    max_n: int = Field(8, ge=1, description="largest n (choices per prompt)")
    max_sequences: int = Field(64, ge=1, description="largest number of prompts x n in one request")
    max_prompt_tokens: int = Field(65536, ge=1, description="longest prompt in tokens (a list item or a string)")
    max_tokens_limit: int = Field(16384, ge=1, description="largest max_tokens a request may ask for")
    clamp_max_tokens: bool = Field(False, description="clamp max_tokens over the limit instead of answering 400")
    max_prompt_logprobs: int = Field(
        524288, ge=1, description="most prompt logprob values one request may ask for: tokens x choices x (logprobs+1)"
    )
    chat_max_tokens: int = Field(1024, ge=1, description="max_tokens of a chat completion that sets none")
    reject_unknown_fields: bool = Field(
        False, description="answer 400 to request fields the API does not know, instead of ignoring them"
    )
    prefill_chunk: int | None = Field(None, ge=1, description="prompt tokens per prefill step (a window multiple)")
    prompt_tokens_per_step: int = Field(
        512,
        ge=1,
        description="most prompt tokens one step reads, over all prompts being read (at least one chunk): bounds "
        "how long running streams wait for their next token while prompts arrive",
    )
    read_whole_prompt: bool = Field(
        False,
        description="read every prompt token, not only the last ones the model's local attention can still see "
        "(the logits are the same either way; for comparison)",
    )
    compile: bool = Field(
        False,
        description="compile the decode step before serving (torch.compile; on a CPU three graphs of tens of "
        "seconds each, cached on disk; on CUDA, CUDA graphs per batch bucket): faster steps, slower start",
    )
    grammar_max_bytes: int = Field(
        65536, ge=1, description="longest JSON schema, pattern, grammar or choice list a request may constrain with"
    )
    grammar_compile_timeout: float = Field(
        5.0, gt=0, description="seconds a request's constraint may take to compile (waiting included) before a 400"
    )
    grammar_cache_size: int = Field(
        32, ge=0, description="compiled constraints kept, by their text (a 64 KiB one holds about 4 MiB)"
    )
    api_key: typing.Annotated[list[str], NoDecode] = Field(
        [],
        description="require `Authorization: Bearer KEY` (repeatable; the variable takes keys separated by ,)",
        repr=False,
    )
    api_key_file: Path | None = Field(None, description="file with one API key per line (keeps keys out of ps)")
    public_metrics: bool = Field(False, description="serve /metrics without the API key")
    public_docs: bool = Field(False, description="serve /docs, /redoc and /openapi.json without the API key")
    playground: bool = Field(True, description="serve the browser playground at /")
    max_body_bytes: int = Field(4 * MiB, ge=1024, description="largest request body; larger ones get 413")
    max_header_bytes: int = Field(16384, ge=1024, description="largest request head (request line and headers)")
    max_headers: int = Field(100, ge=8, description="most header fields in one request")
    header_timeout: float = Field(10.0, gt=0, description="seconds a connection may take to send a request head")
    body_timeout: float = Field(60.0, gt=0, description="seconds a request body may take to arrive after its head")
    keepalive_timeout: float = Field(5.0, gt=0, description="seconds an idle keep-alive connection stays open")
    stream_buffer: int = Field(64, ge=1, description="undelivered events a stream may hold before it pauses")
    stall_timeout: float = Field(120.0, gt=0, description="seconds a paused stream may wait for its reader")
    drain_timeout: float = Field(30.0, ge=0, description="seconds streams in flight may run after SIGTERM")
    ping_interval: float = Field(15.0, gt=0, description="seconds between SSE comment pings on an idle stream")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="log level")
    chat_template: Path | None = Field(None, description="Jinja2 chat template file; overrides the checkpoint's")
    chat_template_stop: typing.Annotated[list[str], NoDecode] = Field(
        [],
        description="a stop string that ends the model's turn under --chat-template (repeatable, taken "
        'literally; the variable holds a JSON array such as ["\\n\\n"])',
        json_schema_extra={"metavar": "TEXT"},
    )

    @field_validator("api_key", mode="before")
    @classmethod
    def split_keys(cls, value: object) -> object:
        """The variable holds keys separated by commas (empty: no key); each flag holds one key. A value that
        is given but holds no key is an error, never an open API."""
        if isinstance(value, str):
            if not value.strip():
                return []
            value = value.split(",")
        if isinstance(value, list):
            keys = [str(key).strip() for key in value]
            if not all(keys):
                raise ValueError("an API key must not be empty")
            return keys
        return value

    @field_validator("chat_template_stop", mode="before")
    @classmethod
    def decode_stops(cls, value: object) -> object:
        """The variable holds a JSON array of strings, since a stop may hold commas and newlines, which JSON
        writes on one line with escapes (empty: none); each flag holds one stop, taken literally."""
        if isinstance(value, str):
            if not value.strip():
                return []
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError('must be a JSON array of strings, such as ["\\n\\n"]') from None
        if isinstance(value, list) and not all(isinstance(text, str) and text for text in value):
            raise ValueError("a stop string must be a non-empty string")
        return value

    @model_validator(mode="after")
    def stops_need_a_template(self) -> Settings:
        """Stop strings belong to the template whose turns they end: they come with --chat-template."""
        if self.chat_template_stop and self.chat_template is None:
            raise ValueError("chat_template_stop is given without chat_template")
        return self

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    def served_model_name(self) -> str:
        return self.model_name or self.weights.resolve().name

    def api_key_digests(self) -> list[bytes]:
        """SHA-256 digests of every configured key (flag, variable and file); empty when the API is open.

        Raises OSError or ValueError when the key file cannot be read or holds no key."""
        keys = list(self.api_key)
        if self.api_key_file is not None:
            lines = self.api_key_file.read_text(encoding="utf-8").splitlines()
            from_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            if not from_file:
                raise ValueError(f"the API key file {self.api_key_file} holds no key")
            keys += from_file
        return [hashlib.sha256(key.encode()).digest() for key in keys]


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, named after it (`max_queue` -> `--max-queue`); values are checked by Settings."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = "none" if field.default is None else field.default
        text = f"{field.description} (default: {default})"
        annotation = field.annotation
        if annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(annotation) is list:  # the API keys, the chat template's stops
            metavar = (field.json_schema_extra or {}).get("metavar", "KEY")
            parser.add_argument(flag, action="append", default=None, metavar=metavar, help=text)
        elif typing.get_origin(annotation) is Literal:
            parser.add_argument(flag, choices=typing.get_args(annotation), default=None, help=text)
        else:
            parser.add_argument(flag, default=None, metavar=_metavar(annotation), help=text)


def _metavar(annotation: object) -> str:
    kinds = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    kind = next(kind for kind in kinds if kind is not type(None))
    return {int: "N", float: "SECONDS", Path: "PATH"}.get(kind, "TEXT")


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from WINDOWLM_* variables, overridden by the flags given."""
    overrides = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    return Settings(**overrides)


def weights_folder(given: str | Path | None) -> Path:
    """A command's --weights, else WINDOWLM_WEIGHTS, else the bundled model: the same default as `windowlm
    serve`. Raises SystemExit with a one-line message when it is not a checkpoint folder."""
    folder = Settings().weights if given is None else Path(given)
    if not (folder / "config.json").is_file():
        what = "the bundled model" if given is None else "--weights"
        raise SystemExit(f"windowlm: {what} at {folder} is not a checkpoint folder (no config.json)")
    return folder
