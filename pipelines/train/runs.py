"""A training run folder (``train.output``): whether it holds a run, how far the run got, and what a new run, a
resume or a rerun may do with it.

A folder holds a run when it has the run's config (:data:`RUN_CONFIG_FILE`), Ray Train's run snapshot (from which
Ray Train restores a run into the same folder, whatever the new config says) or a checkpoint. Three ways to start:

- ``new`` (``isa train``): the folder must hold no run, so a rerun never continues an old run under new settings.
- ``resume`` (``isa train --resume RUN_DIR``): the folder must hold a run with steps left; the settings may differ
  from the run's own in :data:`RESUMABLE` keys only.
- ``continue`` (the trials of ``isa tune``/``isa ablate``, which Tune restores into their folders, and the
  quickstart's rerun): a new run, or the run there when it has the same settings (a finished run is left as it is).

No Ray and no torch here: the refusals come before Ray starts.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from isa.checkpoint_files import CONFIG_FILE, STATE_FILE, complete_checkpoints
from isa.config import Config, flatten, from_dict
from isa.errors import IsaError
from isa.storage import filesystem
from pipelines.ray_compat import RUN_SNAPSHOT_FILE

RUN_CONFIG_FILE = "isa_config.json"  # the run's resolved config: what ``isa train --resume`` continues with
Start = Literal["new", "resume", "continue"]

# The settings a resume may change: how far the run goes, on what resources, how it keeps checkpoints and what
# becomes of its final one. Everything else decides what is learnt (the teacher, the cache and its split, the
# student, the loss, the optimiser, the seed and the augmentations) or where the run is recorded (the MLflow store
# and experiment that hold its run id), so it stays the run's own.
RESUMABLE = frozenset(
    {
        "train.max_steps",  # a new total (the LR schedule's cosine stretches to it), above the last checkpoint
        "train.epochs",  # the same, counted in passes
        "train.num_workers",  # the same global batch (train.global_batch_size), split over other workers
        "train.worker_cpus",
        "train.use_gpu",
        "train.torch_threads",
        "train.max_failures",
        "train.checkpoint_every",
        "train.log_every",
        "train.tracking_wait_s",
        "train.num_to_keep",
        "train.register_model",  # what becomes of the final checkpoint
        "train.model_alias",
        "teacher.cache_dir",  # where this machine keeps the teacher's weights (their hash is checked)
    }
)
IGNORED = frozenset({"train.output"})  # the run folder itself, however it is written (moved, relative, absolute)
UNREAD_SECTIONS = frozenset({"cache", "eval", "tune"})  # the sections a training run does not read


class RunFolderError(IsaError):
    """A run folder cannot be used as asked: it holds a run already, none, a finished one, or other settings."""


@dataclass(frozen=True)
class RunFolder:
    """What a run folder holds."""

    uri: str  # train.output, as given
    saved: dict[str, Any] | None  # its config: isa_config.json, else its latest checkpoint's; None: neither
    step: int | None  # its latest complete checkpoint's step; None: no checkpoint
    total: int | None  # the run's total steps at that checkpoint, where it is recorded
    checkpoint_config: dict[str, Any] | None  # that checkpoint's own config

    def progress(self) -> str:
        """``last checkpoint at step 40 of 40``, or ``no checkpoint yet``."""
        if self.step is None:
            return "no checkpoint yet"
        return f"last checkpoint at step {self.step}" + (f" of {self.total}" if self.total else "")

    def config(self) -> Config:
        """The run's config.

        Raises:
            RunFolderError: the folder holds no readable config of the run.
        """
        if self.saved is None:
            raise RunFolderError(f"{self.uri} holds no config of its run (no {RUN_CONFIG_FILE}, no checkpoint)")
        try:
            return from_dict(self.saved)
        except IsaError as error:
            raise RunFolderError(f"the config of the run in {self.uri} is unreadable: {error}") from None


def read_run_folder(uri: str) -> RunFolder | None:
    """What the run folder ``uri`` holds, on any fsspec filesystem; None when it holds no run."""
    fs, path = filesystem(uri)
    config_file = posixpath.join(path, RUN_CONFIG_FILE)
    has_config = fs.exists(config_file)
    has_snapshot = fs.exists(posixpath.join(path, RUN_SNAPSHOT_FILE))
    steps = complete_checkpoints(fs, path) if fs.exists(path) else {}
    if not (has_config or has_snapshot or steps):
        return None
    step = total = checkpoint_config = None
    if steps:
        latest = max(steps, key=lambda folder: (steps[folder], folder))
        state = json.loads(fs.cat_file(posixpath.join(latest, STATE_FILE)))
        checkpoint_config = _json(fs, posixpath.join(latest, CONFIG_FILE)).get("config")
        step = int(state.get("step", 0))
        total = state.get("total_steps") or (checkpoint_config or {}).get("train", {}).get("max_steps") or None
    saved = _json(fs, config_file) if has_config else checkpoint_config
    return RunFolder(uri, saved, step, total, checkpoint_config)


def _json(fs: Any, path: str) -> dict[str, Any]:
    try:
        data = json.loads(fs.cat_file(path))
    except (OSError, ValueError) as error:
        raise RunFolderError(f"{path} is unreadable ({error})") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path} does not hold a mapping")
    return data


def changed_settings(saved: Config, config: Config) -> dict[str, tuple[Any, Any]]:
    """The settings of ``config`` that differ from the run's ``saved`` ones and a resume may not change:
    ``{key: (the run's value, the new value)}``."""
    old, new = flatten(saved), flatten(config)
    return {
        key: (old.get(key), value)
        for key, value in new.items()
        if old.get(key) != value and key not in RESUMABLE | IGNORED and key.partition(".")[0] not in UNREAD_SECTIONS
    }


def known_total(config: Config, run: RunFolder) -> int | None:
    """The total steps ``config`` gives the run, where it is known without reading the cache: ``train.max_steps``,
    or ``train.epochs`` times the steps per epoch of the run's latest checkpoint."""
    if config.train.max_steps:
        return config.train.max_steps
    train = (run.checkpoint_config or {}).get("train", {})
    if run.total and not train.get("max_steps") and train.get("epochs"):
        return config.train.epochs * (run.total // train["epochs"])
    return None


def check_run_folder(config: Config, start: Start) -> RunFolder | None:
    """Every refusal about ``train.output`` that needs no cache read: a new run into a folder that holds one, a
    resume of a folder that holds none, settings a resume may not change, a resume with no steps left (where the
    total is known, see :func:`known_total`; :func:`check_steps_left` tells the rest). Returns what the folder holds.

    Raises:
        RunFolderError: naming the folder, the problem and the way on.
    """
    output = config.train.output
    run = read_run_folder(output)
    if start == "new" and run is not None:
        raise RunFolderError(
            f"{output} already holds a training run ({run.progress()}); continue it with "
            f"'isa train --resume {output}', or choose another train.output"
        )
    if run is None:
        if start == "resume":
            raise _nothing_to_resume(output)
        return None
    changed = changed_settings(run.config(), config)
    if changed:
        listed = "; ".join(f"{key}: {old!r} in the run, {new!r} now" for key, (old, new) in changed.items())
        if start == "resume":
            raise RunFolderError(
                f"a resume continues the run in {output} with its own settings, and these differ: {listed}. "
                f"A resume may change only {', '.join(sorted(RESUMABLE))}: drop the others, or start a new run "
                "with another train.output"
            )
        raise RunFolderError(
            f"{output} holds a training run ({run.progress()}) with other settings ({listed}): choose another "
            "train.output for this run"
        )
    total = known_total(config, run)
    if total is not None:
        check_steps_left(run, total, start)
    return run


def resumed_config(uri: str, overrides: Mapping[str, Mapping[str, Any]]) -> Config:
    """The config a resume of the run in ``uri`` goes on with: the run's own, ``overrides`` (nested, as
    :func:`isa.config.parse_overrides` makes them) on top, and ``train.output`` the folder as given.

    Raises:
        RunFolderError: the folder holds no run, or no readable config of one.
        ConfigError: a bad override.
    """
    run = read_run_folder(uri)
    if run is None:
        raise _nothing_to_resume(uri)
    return from_dict({"train": {"output": uri}}, base=from_dict(overrides, base=run.config()))


def _nothing_to_resume(output: str) -> RunFolderError:
    return RunFolderError(
        f"{output} holds no training run to resume (no {RUN_CONFIG_FILE}, run snapshot or checkpoint): start one "
        f"with 'isa train train.output={output}'"
    )


def check_steps_left(run: RunFolder | None, total: int, start: Start) -> None:
    """Refuse a resume of a run whose latest checkpoint is at (or past) the ``total`` steps the config gives it.

    Raises:
        RunFolderError: naming the run's step and the way on.
    """
    if start != "resume" or run is None or run.step is None or run.step < total:
        return
    raise RunFolderError(
        f"the run in {run.uri} has nothing left to do: its last checkpoint is at step {run.step}, and these "
        f"settings end it at step {total}; raise train.max_steps (or train.epochs) above {run.step} to train it "
        "further"
    )
