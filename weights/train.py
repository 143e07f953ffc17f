"""`windowlm train`: byte-level training of a LocalTransformer on random crops, written as windowlm checkpoints.

One step: a batch of random crops of seq_len + 1 bytes, next-byte cross entropy (optionally under CPU
bfloat16 autocast), AdamW with linear warmup and cosine decay, gradient clipping. Every --eval-every steps the
loss on fixed held-out windows is logged in bits per byte and the run is saved: a checkpoint (config.json +
model.safetensors, see weights/io.py) and a resumable state (weights/train_state.py). At the end the whole
held-out text is evaluated (weights/evaluate.py) and the figure recorded in the checkpoint.

A run is a pure function of its settings, its corpus and --seed (on the same machine and thread count):
the crops come from their own seeded generator, and a resumed run restores that generator, torch's global
one, the optimizer moments and the step, so it continues exactly as if it had not stopped. The model is
causal with use_abs_pos_emb=False, so what it learns on short crops streams at any length.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from model import LocalTransformer
from model.chat_template import ChatTemplate
from model.threads import configure_threads
from weights.byte_inputs import autocast, bytes_tensor
from weights.checkpoint_config import CheckpointError
from weights.data import Corpus, DataError, combine, file_corpus, shakespeare_corpus
from weights.evaluate import evaluate_bits_per_byte, fixed_windows, windows_bits_per_byte
from weights.io import save_checkpoint
from weights.train_settings import (
    RunOptions,
    TrainError,
    TrainSettings,
    add_train_arguments,
    resolve_chat_template,
    resolve_options,
    resolve_settings,
)
from weights.train_state import (
    STATE_DIR,
    TrainState,
    TrainStateError,
    load_train_state,
    restore_group_types,
    save_train_state,
)

__all__ = ["TrainSettings", "Trainer", "add_train_arguments", "evaluate_bits_per_byte", "run_train"]

SAMPLE_PRIME_BYTES = 64


def _text(data: bytes | list[int]) -> str:
    return bytes(data).decode("utf-8", errors="replace")


def build_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW with weight decay on parameters of two or more dimensions only (not norms or biases)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.99), foreach=False)


class Trainer:
    """One training run: the model, its optimizer and data, the step loop, evaluation and saving."""

    def __init__(
        self,
        settings: TrainSettings,
        corpus: Corpus,
        out: str | os.PathLike[str],
        options: RunOptions | None = None,
        state: TrainState | None = None,
        chat_template: ChatTemplate | None = None,
    ) -> None:
        options = RunOptions() if options is None else options
        settings.validate()
        options.validate()
        for side, text in (("training", corpus.train), ("validation", corpus.validation)):
            if len(text) < settings.seq_len + 1:
                raise TrainError(f"the {side} text has {len(text)} bytes, fewer than --seq-len + 1")
        self.settings, self.corpus, self.options, self.out = settings, corpus, options, Path(out)
        self.chat_template = chat_template  # stored in the checkpoint's config.json
        torch.manual_seed(settings.seed)
        self.config = settings.model_config()
        self.model: LocalTransformer = self.config.build().train()
        self.optimizer = build_optimizer(self.model, settings)
        self.crop_rng = torch.Generator().manual_seed(settings.seed)
        self.train_data = bytes_tensor(corpus.train)  # (n,) uint8
        self.offsets = torch.arange(settings.seq_len + 1)  # (L + 1,)
        windows = options.eval_batches * settings.batch_size
        self.val_windows = fixed_windows(corpus.validation, windows, settings.seq_len + 1)  # (N, L + 1)
        self.step = self.saved_step = 0
        self.history: list[dict[str, Any]] = []
        self.wall_time = 0.0
        self.final: dict[str, Any] = {}
        if state is not None:
            self.restore(state)

    def restore(self, state: TrainState) -> None:
        self.model.load_state_dict(state.model, strict=True)
        self.optimizer.load_state_dict(restore_group_types(state.optimizer, self.optimizer))
        self.crop_rng.set_state(state.rng["crops"])
        torch.set_rng_state(state.rng["torch"])
        self.step = self.saved_step = state.step
        self.history = list(state.record["history"])
        self.wall_time = state.record["wall_time_s"]

    def batch(self) -> torch.Tensor:
        """Random crops (B, L + 1) of the training bytes."""
        high = self.train_data.numel() - self.settings.seq_len  # crop starts 0 .. n - L - 1
        starts = torch.randint(high, (self.settings.batch_size,), generator=self.crop_rng)  # (B,)
        return self.train_data[starts[:, None] + self.offsets].long()  # (B, L + 1)

    def train_step(self) -> float:
        """One optimizer step; returns the batch loss in nats per byte."""
        lr = self.settings.learning_rate(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast(self.settings.bf16):
            loss = self.model(self.batch(), return_loss=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.item()

    def run(self, stop_after: int | None = None, progress: bool = True) -> None:
        """Train to --steps (or stop_after more steps), evaluating, sampling and saving on the way."""
        settings, options = self.settings, self.options
        end = settings.steps if stop_after is None else min(settings.steps, self.step + stop_after)
        tokens_per_step = settings.batch_size * settings.seq_len
        last_save = time.perf_counter()
        first_step, losses, stepping = self.step, [], 0.0
        with tqdm(total=settings.steps, initial=self.step, disable=not progress, unit="step", mininterval=2) as bar:
            while self.step < end:
                started = time.perf_counter()
                losses.append(self.train_step())
                stepping += time.perf_counter() - started
                bar.update(1)
                if self.step % 10 == 0 or self.step == end:
                    speed = (self.step - first_step) * tokens_per_step / stepping
                    lr = self.settings.learning_rate(self.step - 1)
                    mean = sum(losses) / len(losses) / math.log(2)  # since the last evaluation
                    bar.set_postfix_str(f"loss {mean:.3f} bpb, lr {lr:.2e}, {speed:,.0f} tok/s")
                evaluate = self.step % options.eval_every == 0 or self.step == end
                if evaluate:
                    now = time.perf_counter()
                    self.wall_time += now - last_save
                    last_save = now
                    self.log_validation(sum(losses) / len(losses), bar)
                    losses = []
                if options.sample_every and self.step % options.sample_every == 0:
                    bar.write(f"--- sample at step {self.step} ---\n{self.sample()}\n---")
                if evaluate:
                    if self.step == settings.steps:
                        self.finish(bar)
                    self.save()

    def log_validation(self, train_loss: float, bar: tqdm) -> None:
        val_bpb = windows_bits_per_byte(self.model, self.val_windows, self.settings.batch_size, self.settings.bf16)
        entry = {
            "step": self.step,
            "train_bpb": train_loss / math.log(2),
            "val_bpb": val_bpb,
            "lr": self.settings.learning_rate(self.step - 1),
            "wall_time_s": round(self.wall_time, 1),
        }
        self.history.append(entry)
        bar.write(f"step {self.step}: train {entry['train_bpb']:.4f} bpb, held-out {val_bpb:.4f} bpb")

    def finish(self, bar: tqdm) -> None:
        """Evaluate the whole held-out text and take a sample for the record."""
        bar.write(f"evaluating the whole held-out text ({len(self.corpus.validation):,} bytes)...")
        started = time.perf_counter()
        bpb = evaluate_bits_per_byte(self.model, self.corpus.validation, self.options.eval_seq_len)
        prompt, text = self.sample_pair()
        self.final = {
            "validation": {
                "bits_per_byte": bpb,
                "bytes": len(self.corpus.validation),
                "seq_len": self.options.eval_seq_len,
                "method": "weights.evaluate.evaluate_bits_per_byte: non-overlapping windows, float32",
                "eval_time_s": round(time.perf_counter() - started, 1),
            },
            "sample": {"prompt": prompt, "text": text, "temperature": 0.8, "filter_thres": 0.9},
        }
        bar.write(f"held-out: {bpb:.4f} bits per byte")

    def sample_pair(self) -> tuple[str, str]:
        """(prompt, continuation): sample_bytes bytes after a line from the middle of the held-out text."""
        text = self.corpus.validation
        start = text.find(b"\n", len(text) // 2) + 1
        prime = text[start : start + SAMPLE_PRIME_BYTES] or text[:SAMPLE_PRIME_BYTES]
        tokens = torch.tensor(list(prime))[None]  # (1, P)
        out = self.model.generate(tokens, self.options.sample_bytes, temperature=0.8, seed=self.settings.seed)
        return _text(prime), _text(out[0].tolist())

    def sample(self) -> str:
        prompt, text = self.sample_pair()
        return prompt + text

    def record(self) -> dict[str, Any]:
        """Training provenance for config.json."""
        settings = self.settings
        best = min(self.history, key=lambda entry: entry["val_bpb"], default=None)
        record: dict[str, Any] = {
            "trainer": "windowlm train",
            "corpus": self.corpus.description,
            "corpus_sha256": self.corpus.fingerprint(),
            "steps": self.step,
            "planned_steps": settings.steps,
            "batch_size": settings.batch_size,
            "seq_len": settings.seq_len,
            "tokens_seen": self.step * settings.batch_size * settings.seq_len,
            "settings": dataclasses.asdict(settings),
            "seed": settings.seed,
            "threads": self.options.threads,
            "final_val_bpb_windows": self.history[-1]["val_bpb"] if self.history else None,
            "best_val_bpb_windows": None if best is None else best["val_bpb"],
            "best_step": None if best is None else best["step"],
            "val_windows": {"count": self.val_windows.shape[0], "length": self.val_windows.shape[1]},
            "curve": self.history,
            "wall_time_s": round(self.wall_time, 1),
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            **self.final,
        }
        if "held_out_works" in self.corpus.description:
            record["held_out_works"] = self.corpus.description["held_out_works"]
        return record

    def save(self) -> None:
        """Write the checkpoint and the resumable state into --out."""
        save_checkpoint(
            self.model, self.out, config=self.config, training=self.record(), chat_template=self.chat_template
        )
        rng = {"crops": self.crop_rng.get_state(), "torch": torch.get_rng_state()}
        record = {
            "settings": dataclasses.asdict(self.settings),
            "options": dataclasses.asdict(self.options),
            "corpus_sha256": self.corpus.fingerprint(),
            "history": self.history,
            "wall_time_s": self.wall_time,
        }
        state = TrainState(self.step, self.model.state_dict(), self.optimizer.state_dict(), rng, record)
        save_train_state(self.out, state)
        self.saved_step = self.step


def load_corpus(args: argparse.Namespace) -> Corpus:
    parts = []
    if args.shakespeare:
        parts.append(shakespeare_corpus(args.shakespeare, fraction=args.val_fraction, seed=args.split_seed))
    if args.data:
        parts.append(file_corpus(args.data, validation_files=args.val_data, tail_fraction=args.tail_fraction))
    elif args.val_data:
        raise DataError("--val-data needs --data")
    if not parts:
        raise DataError("give training text: --data FILE [FILE ...] and/or --shakespeare DIR")
    return combine(parts)


def run_train(args: argparse.Namespace) -> int:
    """`windowlm train`; returns the exit code (2 for bad arguments or data)."""
    out = Path(args.out)
    try:
        corpus = load_corpus(args)
        state = None
        if args.resume:
            state = load_train_state(out)
            if state.record["corpus_sha256"] != corpus.fingerprint():
                raise TrainError("the training data differ from those of the run being resumed")
        elif (out / STATE_DIR).exists():
            raise TrainError(f"{out} already holds a training run; pass --resume to continue it")
        recorded = None if state is None else state.record
        settings = resolve_settings(args, None if recorded is None else recorded["settings"])
        options = resolve_options(args, None if recorded is None else recorded["options"])
        if args.stop_after is not None and args.stop_after < 1:
            raise TrainError("--stop-after must be at least 1")
        chat_template = resolve_chat_template(args, out if state is not None else None)
        configure_threads(options.threads)
        trainer = Trainer(settings, corpus, out, options, state, chat_template)
    except (DataError, TrainError, TrainStateError, CheckpointError) as error:
        print(f"windowlm train: {error}", file=sys.stderr)
        return 2
    parameters = sum(p.numel() for p in trainer.model.parameters())
    print(
        f"windowlm train: {parameters:,} parameters; {len(corpus.train):,} training bytes, "
        f"{len(corpus.validation):,} held out; step {trainer.step} of {settings.steps}",
        file=sys.stderr,
    )
    if trainer.step >= settings.steps:
        print(f"windowlm train: the run in {out} is finished ({trainer.step} steps)", file=sys.stderr)
        return 0
    try:
        trainer.run(stop_after=args.stop_after, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(
            f"windowlm train: interrupted at step {trainer.step}; {out} holds step {trainer.saved_step}, "
            "which --resume continues",
            file=sys.stderr,
        )
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights.train", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
