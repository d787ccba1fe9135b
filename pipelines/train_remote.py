"""What ``isa train`` hands to Ray: the worker entry point and the data tasks' function.

Ray Train's controller and Ray Data's coordinator actors unpickle these (module and name) without running
them. This module imports nothing heavy, so those long-lived helper processes stay small (Ray Data's
``SplitCoordinator`` and ``DatasetManager``: about 120 MB instead of 570 MB each). torch, open_clip and
MLflow are imported only in the training workers; the data tasks need PIL and NumPy alone.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


def is_validation(image_id: str, fraction: float) -> bool:
    """The held-out split, decided by the id's hash: stable across runs, workers and resumes."""
    return int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16) / 2**32 < fraction


def split_and_view(
    batch: dict[str, Any], *, validation: bool, fraction: float, size: int, scale_min: float, hflip: bool
) -> dict[str, np.ndarray]:
    """CPU task: keep one split's rows, decode and view their JPEGs, embeddings as float32 rows."""
    from isa.augment import eval_view, train_view, views

    rows = np.flatnonzero([is_validation(str(i), fraction) == validation for i in batch["id"]])
    transform = eval_view(size) if validation else train_view(size, scale_min, hflip)
    out = {"view": views([batch["image"][i] for i in rows], transform, size)}  # (n, S, S, 3) uint8
    for column in ("teacher_emb", "teacher_local"):
        if column in batch:
            out[column] = np.array([np.asarray(batch[column][i], np.float32) for i in rows], np.float32)  # (n, K)
    return out


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: :func:`pipelines.train_worker.train_loop`, imported in the worker."""
    from pipelines.train_worker import train_loop as loop

    loop(loop_config)
