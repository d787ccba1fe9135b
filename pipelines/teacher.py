"""The configured teacher's fingerprint, the one rule every stage uses to tell teachers apart.

The model is loaded in a one-off Ray task whose process exits when it is done, so this module imports
nothing heavy: the drivers of ``isa train`` and ``isa tune`` never load torch or open_clip (about 0.5 GB each),
nor does ``isa embed``'s unless it runs the tower itself (``cache.tower_in``). A stage that loads the teacher in
its own process (:func:`load_teacher_here`: ``isa eval``, a tower in ``isa embed``'s driver) fingerprints the
teacher it loaded, and the later stages of that process take that fingerprint instead of loading the teacher again.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from isa.cache import fingerprint_mismatch
from isa.config import NO_WEIGHTS, Config, TeacherConfig, looks_like_tag
from isa.errors import IsaError

if TYPE_CHECKING:
    from isa.teacher import Teacher


def _fingerprint(config: TeacherConfig) -> dict[str, Any]:
    from isa.build import build_teacher

    return build_teacher(config).fingerprint()


def teacher_fingerprint(config: TeacherConfig) -> dict[str, Any]:
    """The configured teacher's fingerprint (model, weights hash, preprocessing, dims), made in a Ray task.

    The task's worker process exits afterwards (``max_calls=1``), taking the model's memory with it. It
    reserves no CPU, so it never waits behind a running trainer (``isa tune`` starts runs beside others). A
    teacher that cannot be loaded raises the loader's own error here. A process asks once per teacher (a
    weights file counts as the same while its size and modification time are): the quickstart's stages share
    one answer, and the trials of ``isa tune`` take their driver's (:func:`known_fingerprints`).
    """
    key = _fingerprint_key(config)
    if key not in _FINGERPRINTS:  # None (never reused) is never stored
        import ray

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


def load_teacher_here(config: TeacherConfig, device: str = "cpu") -> Teacher:
    """The configured teacher, loaded in this process (torch and open_clip with it); its fingerprint becomes
    :func:`teacher_fingerprint`'s answer for this config in this process, under the same rule (a weights file as
    it was before loading), so that no later stage of the process loads the teacher again only to fingerprint it:
    the galleries ``isa eval`` embeds, or ``isa train`` after an ``isa embed`` that ran its tower in the driver."""
    from isa.build import build_teacher

    key = _fingerprint_key(config)  # before reading the weights: a file changed meanwhile is read again later
    teacher = build_teacher(config, device)
    if key is not None:
        _FINGERPRINTS[key] = copy.deepcopy(teacher.fingerprint())
    return teacher


def known_fingerprints() -> list[tuple[tuple, dict[str, Any]]]:
    """The fingerprints this process has asked for, each with its key, to hand to the processes it starts
    (:func:`remember`): the trials of a sweep then load no teacher that the sweep's driver has fingerprinted."""
    return [(key, copy.deepcopy(fingerprint)) for key, fingerprint in _FINGERPRINTS.items()]


def remember(known: Sequence[tuple[tuple, Mapping[str, Any]]]) -> None:
    """Take fingerprints from another process's :func:`known_fingerprints`. Each is reused here only where this
    process finds the same key: the same teacher config and, for a weights file, the same size and modification
    time here."""
    for key, fingerprint in known:
        _FINGERPRINTS.setdefault(tuple(key), copy.deepcopy(dict(fingerprint)))


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


TEACHER_CHOICE = frozenset({"teacher.name", "teacher.pretrained"})  # the keys that choose the teacher


class TeacherMismatchError(IsaError):
    """Two things that must share a teacher (a checkpoint, a cache, the configured teacher) name different ones."""


def describe(fingerprint: Mapping[str, Any]) -> str:
    """A saved teacher in words: ``MODEL (pretrained TAG)``."""
    return f"{fingerprint.get('model')} (pretrained {fingerprint.get('pretrained')})"


def saved_teacher(fingerprint: Mapping[str, Any], cache_dir: str | None = None) -> TeacherConfig:
    """The teacher config that made a saved fingerprint (a cache's manifest, a checkpoint's config.json): its
    model name and pretrained tag or weights file, read without loading anything; ``cache_dir`` is this machine's."""
    return TeacherConfig(name=fingerprint["model"], pretrained=fingerprint["pretrained"], cache_dir=cache_dir)


def named_mismatch(config: TeacherConfig, fingerprint: Mapping[str, Any]) -> str | None:
    """Why the configured teacher is not the one a saved fingerprint names, told without loading it: another model,
    or another pretrained tag (random init counts as one tag); None when it may be the same. Weights files (on
    either side) are told apart by their hash, once the teacher is loaded."""
    if config.name != fingerprint.get("model"):
        return "another model"
    mine, theirs = _weights_name(config.pretrained), _weights_name(str(fingerprint.get("pretrained")))
    if mine != theirs and looks_like_tag(config.pretrained) and looks_like_tag(str(fingerprint.get("pretrained"))):
        return "other pretrained weights"
    return None


def _weights_name(pretrained: str) -> str:
    return "none" if pretrained.lower() in NO_WEIGHTS else pretrained


def agreed_teacher(sources: Sequence[tuple[str, Mapping[str, Any]]]) -> tuple[str, Mapping[str, Any]] | None:
    """The first of ``(what, fingerprint)`` saved sources (checkpoints, caches), once every other one has been
    checked to come from the same teacher; None for no source.

    Raises:
        TeacherMismatchError: two sources come from different teachers, both named.
    """
    if not sources:
        return None
    first, fingerprint = sources[0]
    for what, other in sources[1:]:
        mismatch = fingerprint_mismatch(fingerprint, other)
        if mismatch:
            raise TeacherMismatchError(
                f"{first} and {what} come from different teachers, {describe(fingerprint)} and {describe(other)} "
                f"({mismatch}): use a checkpoint and a cache of the same teacher"
            )
    return sources[0]


def choose_teacher(config: Config, given: Collection[str], sources: Sequence[tuple[str, Mapping[str, Any]]]) -> Config:
    """The config with the teacher of the saved ``sources`` in the teacher keys (``teacher.name``,
    ``teacher.pretrained``) the user did not give, once checked against them.

    Args:
        config: the stage's resolved config.
        given: the dotted keys the user gave (:func:`isa.config.given_keys`); :data:`TEACHER_CHOICE`: all of them.
        sources: ``(what, fingerprint)`` of the saved work the stage reads, e.g. ``("checkpoint runs/a", {...})``.

    Raises:
        TeacherMismatchError: the sources disagree, or the teacher given is another than theirs (both named).
    """
    agreed = agreed_teacher(sources)
    if agreed is None:
        return config
    what, fingerprint = agreed
    saved = saved_teacher(fingerprint)
    taken = {key: getattr(saved, key) for key in ("name", "pretrained") if f"teacher.{key}" not in given}
    if taken:
        config = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, **taken))
    reason = named_mismatch(config.teacher, fingerprint)
    if reason:
        raise TeacherMismatchError(
            f"the teacher given, {config.teacher.name} (pretrained {config.teacher.pretrained}), is {reason} than "
            f"the one of {what}, {describe(fingerprint)}: leave out the teacher setting (teacher.name, "
            "teacher.pretrained) to use that one"
        )
    return config


def check_fingerprint(fingerprint: Mapping[str, Any], sources: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """Refuse a loaded teacher (its fingerprint) that is not the one of each saved source: the same name can hold
    other weights (another weights file, another version of a tag).

    Raises:
        TeacherMismatchError: naming the source and both teachers.
    """
    for what, saved in sources:
        mismatch = fingerprint_mismatch(saved, fingerprint)
        if mismatch:
            raise TeacherMismatchError(
                f"the teacher {describe(fingerprint)} is not the one of {what} ({mismatch}): give that teacher's "
                "weights, or use a checkpoint and caches of this teacher"
            )
