"""A checkpoint directory's files and how to tell a complete one (no torch: drivers read run folders too).

A copy of a checkpoint cut short (Ray Train uploading it to storage when its worker dies) is told apart from
a complete one: its ``state.json`` does not parse, or a file's size differs from the one recorded there.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from isa.errors import IsaError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "student.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, STATE_FILE)
SIZES_KEY = "file_sizes"  # in state.json: bytes of each other file, so a copy cut short is recognised
TRAINING_STATE_KEYS = ("rng",)  # in state.json: what only a resumed run needs (a model leaves it out)


class CheckpointError(IsaError):
    """A checkpoint directory is missing, incomplete or unreadable."""


def complete_state(state_text: str | bytes, sizes: Mapping[str, int]) -> dict[str, Any] | None:
    """A checkpoint directory's state when the directory is complete, else None.

    Args:
        state_text: the contents of its ``state.json``.
        sizes: the size in bytes of each file in the directory, by name (any filesystem).
    """
    try:
        state = json.loads(state_text)
    except ValueError:  # empty or cut short
        return None
    if not isinstance(state, dict) or any(name not in sizes for name in REQUIRED_FILES):
        return None
    if any(sizes.get(name) != size for name, size in state.get(SIZES_KEY, {}).items()):
        return None
    return state


def complete_checkpoints(fs: Any, path: str) -> dict[str, int]:
    """The step of each complete checkpoint at ``path`` on the fsspec filesystem ``fs``: ``path`` itself when
    it is one, else the ``checkpoint_*/*`` folders of a run below it (copies cut short are left out)."""
    direct = posixpath.join(path, STATE_FILE)
    steps = {}
    for state_file in [direct] if fs.exists(direct) else fs.glob(f"{path}/checkpoint_*/*/{STATE_FILE}"):
        folder = posixpath.dirname(state_file)
        sizes = {posixpath.basename(f["name"]): f["size"] for f in fs.ls(folder, detail=True) if f["type"] == "file"}
        state = complete_state(fs.cat_file(state_file), sizes)
        if state is not None:
            steps[folder] = state.get("step", 0)
    return steps


def saved_checkpoint(uri: str) -> tuple[str, dict[str, Any]]:
    """The checkpoint folder ``uri`` names (itself, or a run folder's latest complete checkpoint) as a URI, and
    its ``config.json`` (the resolved config and the teacher fingerprint), on any fsspec filesystem, without
    loading a model.

    Raises:
        CheckpointError: nothing complete that looks like a checkpoint there, or an unreadable config.json.
    """
    from isa.storage import filesystem, full_uri

    fs, path = filesystem(uri)
    found = latest_checkpoint(fs, path)
    if found is None:
        raise CheckpointError(
            f"no complete checkpoint at {uri}: expected a checkpoint folder ({', '.join(REQUIRED_FILES)}) or a "
            "training run folder holding checkpoint_*/isa"
        )
    folder = full_uri(fs, found)
    try:
        saved = json.loads(fs.cat_file(posixpath.join(found, CONFIG_FILE)))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {folder}: {CONFIG_FILE} is unreadable ({error})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict) or "teacher" not in saved:
        raise CheckpointError(f"checkpoint {folder}: {CONFIG_FILE} lacks the training config or teacher fingerprint")
    return folder, saved


def latest_checkpoint(fs: Any, path: str) -> str | None:
    """Of :func:`complete_checkpoints`, the one with the highest step (ties: the last folder name); None if none."""
    steps = complete_checkpoints(fs, path)
    return max(steps, key=lambda folder: (steps[folder], folder)) if steps else None


def write_model(checkpoint: str | os.PathLike, target: str | os.PathLike) -> Path:
    """The model of a local checkpoint folder, written to ``target``: its weights and config, and a ``state.json``
    with its step and MLflow run id but without the RNG states; the optimizer and schedule (``optimizer.pt``) stay
    out. A checkpoint folder itself, which ``isa.checkpoint.load_checkpoint`` reads (its optimizer None).

    Raises:
        CheckpointError: ``checkpoint`` is not a complete checkpoint folder.
    """
    source, folder = Path(checkpoint), Path(target)
    sizes = {item.name: item.stat().st_size for item in source.iterdir() if item.is_file()}
    state = complete_state((source / STATE_FILE).read_bytes(), sizes) if (source / STATE_FILE).is_file() else None
    if state is None:
        raise CheckpointError(f"{source} is not a complete checkpoint folder ({', '.join(REQUIRED_FILES)})")
    folder.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copyfile(source / name, folder / name)
    kept = {key: value for key, value in state.items() if key not in (*TRAINING_STATE_KEYS, SIZES_KEY)}
    kept[SIZES_KEY] = {name: (folder / name).stat().st_size for name in (CONFIG_FILE, WEIGHTS_FILE)}
    (folder / STATE_FILE).write_text(json.dumps(kept, indent=2, sort_keys=True))
    return folder
