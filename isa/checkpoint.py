"""Checkpoints: a directory that describes itself (docs/checkpoints.md).

```
checkpoint_000500/
  config.json           everything needed to rebuild the student, teacher fingerprint included
  student.safetensors   trainable weights (student and task parameters such as the temperature)
  optimizer.pt          optimizer and scheduler state, read with torch.load(weights_only=True)
  state.json            step, epoch, RNG states, anything else the trainer records, and the other files' sizes
```

Writes are atomic: files go to a hidden sibling directory that is renamed into place only when complete,
so a crash during a save never leaves a directory that looks like a valid checkpoint. A copy of a checkpoint
cut short (Ray Train uploading it to storage when its worker dies) is recognised too: its ``state.json`` does
not parse, or a file's size differs from the one recorded there. Loading never unpickles model weights.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from isa.checkpoint_files import (
    CONFIG_FILE,
    OPTIMIZER_FILE,
    REQUIRED_FILES,
    SIZES_KEY,
    STATE_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    complete_state,
    latest_checkpoint,
)


@dataclass
class Checkpoint:
    """The contents of a checkpoint directory."""

    config: dict[str, Any]  # the resolved config plus the teacher fingerprint
    weights: dict[str, torch.Tensor]  # trainable state dict
    state: dict[str, Any]  # step, epoch, rng, ...
    optimizer: dict[str, Any] | None = None  # optimizer/scheduler state; None when not saved


def capture_rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch CPU random states in JSON-friendly form."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }


def restore_rng_state(rng: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    raw = np.frombuffer(base64.b64decode(rng["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))


def save_checkpoint(
    path: str | os.PathLike,
    *,
    config: dict[str, Any],
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    optimizer: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically; an existing one at ``path`` is replaced.

    Args:
        path: the checkpoint directory to create.
        config: JSON-serialisable config (the resolved config and the teacher fingerprint).
        weights: tensors to store in safetensors form (moved to CPU, made contiguous).
        state: JSON-serialisable trainer state (step, epoch, rng, ...).
        optimizer: optimizer/scheduler state dicts, saved with torch.save for weights_only loading.

    Returns:
        The final directory.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in weights.items()}
        save_file(tensors, staging / WEIGHTS_FILE)
        if optimizer is not None:
            torch.save(optimizer, staging / OPTIMIZER_FILE)
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        sizes = {item.name: item.stat().st_size for item in staging.iterdir()}
        (staging / STATE_FILE).write_text(json.dumps({**state, SIZES_KEY: sizes}, indent=2, sort_keys=True))
        _fsync_dir(staging)
        if final.exists():
            retired = final.parent / f".{final.name}.old-{uuid.uuid4().hex}"
            final.rename(retired)
            staging.rename(final)
            shutil.rmtree(retired)
        else:
            staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return final


def _fsync_dir(directory: Path) -> None:
    for item in directory.iterdir():
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())


def _local_state(directory: Path) -> dict[str, Any] | None:
    if not (directory / STATE_FILE).is_file():
        return None
    sizes = {item.name: item.stat().st_size for item in directory.iterdir() if item.is_file()}
    return complete_state((directory / STATE_FILE).read_bytes(), sizes)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a complete checkpoint directory."""
    return _local_state(Path(path)) is not None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint directory without unpickling model weights.

    Raises:
        CheckpointError: the directory or one of its required files is missing or unreadable.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is incomplete: missing {missing}")
    state = _local_state(directory)  # parsed once, with the sizes checked
    if state is None:
        raise CheckpointError(
            f"checkpoint {directory} is incomplete: {STATE_FILE} does not parse or a file's size differs from the "
            "one it records (a copy cut short?)"
        )
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        weights = load_file(directory / WEIGHTS_FILE, device=str(map_location))
    except (OSError, ValueError, SafetensorError) as error:
        raise CheckpointError(f"checkpoint {directory} is unreadable: {error}") from error
    optimizer = None
    if (directory / OPTIMIZER_FILE).is_file():
        optimizer = torch.load(directory / OPTIMIZER_FILE, map_location=map_location, weights_only=True)
    return Checkpoint(config=config, weights=weights, state=state, optimizer=optimizer)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself when it is a checkpoint, else the latest (highest step) ``checkpoint_*/isa`` of a run folder.

    Raises:
        CheckpointError: nothing that looks like a checkpoint under ``path``.
    """
    directory = Path(path)
    if is_checkpoint(directory):
        return directory
    latest = latest_checkpoint(LocalFileSystem(), str(directory))
    if latest is None:
        raise CheckpointError(
            f"no checkpoint at {directory}: expected a checkpoint directory ({', '.join(REQUIRED_FILES)}) or a "
            "training run folder holding checkpoint_*/isa"
        )
    return Path(latest)
