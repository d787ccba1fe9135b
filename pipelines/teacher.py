"""The configured teacher's fingerprint, the one rule every stage uses to tell teachers apart.

The model is loaded in a one-off Ray task whose process exits when it is done, so this module imports
nothing heavy: the drivers of ``isa embed``, ``isa train`` and ``isa tune`` never load torch or open_clip
(about 0.5 GB each).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import ray

from isa.config import TeacherConfig


def _fingerprint(config: TeacherConfig) -> dict[str, Any]:
    from isa.build import build_teacher

    return build_teacher(config).fingerprint()


def teacher_fingerprint(config: TeacherConfig) -> dict[str, Any]:
    """The configured teacher's fingerprint (model, weights hash, preprocessing, dims), made in a Ray task.

    The task's worker process exits afterwards (``max_calls=1``), taking the model's memory with it. It
    reserves no CPU, so it never waits behind a running trainer (``isa tune`` starts runs beside others). A
    teacher that cannot be loaded raises the loader's own error here. A process asks once per teacher (a
    weights file counts as the same while its size and modification time are); the quickstart and ``isa tune``
    ask for every stage and run.
    """
    key = _fingerprint_key(config)
    if key not in _FINGERPRINTS:  # None (never reused) is never stored
        task = ray.remote(num_cpus=0, max_calls=1)(_fingerprint)
        try:
            fingerprint = ray.get(task.remote(config))
        except ray.exceptions.RayTaskError as error:
            raise error.cause from None
        if key is None:
            return fingerprint
        _FINGERPRINTS[key] = fingerprint
    return copy.deepcopy(_FINGERPRINTS[key])  # each caller its own copy


_FINGERPRINTS: dict[tuple, dict[str, Any]] = {}


def _fingerprint_key(config: TeacherConfig) -> tuple | None:
    """The teacher config and its weights file's (size, mtime); None where a fingerprint may not be reused."""
    if config.name.startswith("local-dir:"):  # a folder whose files may change under the same name
        return None
    if os.path.isfile(config.pretrained):
        stat = os.stat(config.pretrained)
        return config, stat.st_size, stat.st_mtime_ns
    if "://" in config.pretrained or os.sep in config.pretrained:  # a remote or missing file: read it every time
        return None
    return config, None, None  # an open_clip tag or "none"


def checkpoint_teacher(uri: str) -> tuple[TeacherConfig, dict[str, Any], str]:
    """The teacher a checkpoint (or a run folder's latest complete checkpoint) was trained against, read from its
    ``config.json`` on any fsspec filesystem without loading a model: its config, its fingerprint and the
    checkpoint folder's URI.

    Raises:
        CheckpointError: no complete checkpoint at ``uri``, or an unreadable config.
    """
    from isa.checkpoint_files import CheckpointError, saved_checkpoint
    from isa.config import from_dict
    from isa.errors import IsaError

    folder, saved = saved_checkpoint(uri)
    try:
        return from_dict(saved["config"]).teacher, saved["teacher"], folder
    except IsaError as error:
        raise CheckpointError(f"checkpoint {folder} has an unreadable config: {error}") from None
