"""The resumable state of a training run: tensors in safetensors, everything else in JSON.

Why not torch.save: a resume file holds only tensors (weights, AdamW moments, RNG states) and small
numbers, so it needs no pickle at all, and windowlm never unpickles outside the converter. The folder:

    train_state/state.safetensors   model.<name>, optimizer.<param index>.<key>, rng.<name>
    train_state/state.json          step, settings, optimizer param groups, history, corpus fingerprint

Each file is written under a temporary name and renamed; the step is in both, and a pair whose steps
differ (a crash between the two renames) is refused rather than resumed from mixed steps.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from weights.io import write_atomically

STATE_DIR = "train_state"
TENSORS_FILE = "state.safetensors"
JSON_FILE = "state.json"
STATE_FORMAT = "windowlm-train-state"


class TrainStateError(ValueError):
    """A training state folder that cannot be resumed from."""


@dataclass
class TrainState:
    """What a resumed run needs beyond its command line."""

    step: int
    model: dict[str, Tensor]
    optimizer: dict[str, Any]  # a torch optimizer state_dict
    rng: dict[str, Tensor]  # name -> torch generator state (uint8)
    record: dict[str, Any]  # settings, history, fingerprint: JSON values the trainer owns


def save_train_state(directory: str | os.PathLike[str], state: TrainState) -> Path:
    """Write `state` into directory/train_state and return that folder."""
    folder = Path(directory) / STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{name}": tensor.detach().clone().contiguous() for name, tensor in state.model.items()}
    tensors.update({f"rng.{name}": value.clone() for name, value in state.rng.items()})
    moments: dict[str, Any] = {}
    for index, values in state.optimizer["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().clone().contiguous()
            else:
                moments.setdefault(str(index), {})[key] = value
    document = {
        "format": STATE_FORMAT,
        "step": state.step,
        "optimizer_groups": state.optimizer["param_groups"],
        "optimizer_scalars": moments,
        "record": state.record,
    }
    text = json.dumps(document, indent=1, allow_nan=False) + "\n"
    metadata = {"step": str(state.step)}
    write_atomically(folder / TENSORS_FILE, lambda path: save_file(tensors, path, metadata=metadata))
    write_atomically(folder / JSON_FILE, lambda path: path.write_text(text, encoding="utf-8"))
    return folder


def load_train_state(directory: str | os.PathLike[str]) -> TrainState:
    """Read directory/train_state written by save_train_state."""
    folder = Path(directory) / STATE_DIR
    json_path, tensors_path = folder / JSON_FILE, folder / TENSORS_FILE
    try:
        document = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise TrainStateError(f"{json_path}: no such file; nothing to resume in {directory}") from error
    except (OSError, ValueError) as error:
        raise TrainStateError(f"{json_path}: cannot be read: {error}") from error
    required = ("step", "optimizer_groups", "optimizer_scalars", "record")
    if (
        not isinstance(document, dict)
        or document.get("format") != STATE_FORMAT
        or not all(key in document for key in required)
    ):
        raise TrainStateError(f"{json_path}: not a windowlm training state")
    try:
        tensors = load_file(tensors_path, device="cpu")
        with safe_open(tensors_path, framework="pt") as file:
            header_step = (file.metadata() or {}).get("step")
    except (SafetensorError, OSError, ValueError) as error:
        raise TrainStateError(f"{tensors_path}: cannot be read: {error}") from error
    if header_step != str(document["step"]):
        raise TrainStateError(
            f"{folder}: {TENSORS_FILE} is from step {header_step} but {JSON_FILE} from step {document['step']}"
        )

    model = {name.removeprefix("model."): t for name, t in tensors.items() if name.startswith("model.")}
    rng = {name.removeprefix("rng."): t for name, t in tensors.items() if name.startswith("rng.")}
    optimizer_state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            optimizer_state.setdefault(int(index), {})[key] = tensor
    for index, values in document["optimizer_scalars"].items():
        optimizer_state.setdefault(int(index), {}).update(values)
    optimizer = {"state": optimizer_state, "param_groups": document["optimizer_groups"]}
    return TrainState(step=document["step"], model=model, optimizer=optimizer, rng=rng, record=document["record"])


def restore_group_types(saved: dict[str, Any], fresh: torch.optim.Optimizer) -> dict[str, Any]:
    """JSON turns tuples (AdamW's betas) into lists; give each group value the type the optimizer uses."""
    groups = []
    for saved_group, fresh_group in zip(saved["param_groups"], fresh.param_groups, strict=True):
        group = dict(saved_group)
        for key, value in fresh_group.items():
            if isinstance(value, tuple) and isinstance(group.get(key), list):
                group[key] = tuple(group[key])
        groups.append(group)
    return {"state": saved["state"], "param_groups": groups}
