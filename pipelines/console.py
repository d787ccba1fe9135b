"""What the stages print: Ray Data's progress bars in a terminal, plain lines in a log, no warning a user cannot act on.

The driver decides once, before Ray starts (:func:`configure`, called by :func:`pipelines.stage.init_ray`):

- progress bars where the driver's standard output and standard error are both terminals; none where either goes
  to a file, a pipe or ``ray job submit``'s log. ``ISA_PROGRESS=1`` or ``ISA_PROGRESS=0`` forces either.
- without progress bars, no terminal escape sequences: Ray's colored ``(Worker pid=...)`` prefixes are off
  (``RAY_COLOR_PREFIX=0`` unless set) and Ray's own messages are printed plain.
- Ray Data's "Starting execution" and "Execution plan" lines and its notices about its own progress display are
  left out of the console (the session's ``logs/ray-data`` keeps them).

Datasets that Ray Train reads inside its own processes draw no bars at all (:func:`without_progress_bars`): Ray
sends their bars to the driver as ``tqdm_ray`` bars, which it draws again after they finish, until the process
exits; ``isa train``'s step lines show its progress instead. Its workers call :func:`quiet_worker`.

:data:`DEPENDENCY_WARNINGS` is the one list of warnings from dependencies that are silenced, each by category and
message, each with the reason it cannot be fixed here.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

from isa.config import ConfigError

PROGRESS_ENV = "ISA_PROGRESS"
_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # an ANSI control sequence (colors, cursor moves)

# (category's module, category, message start, why it cannot be fixed here)
DEPENDENCY_WARNINGS: tuple[tuple[str, str, str, str], ...] = (
    (
        "ray.util.annotations",
        "RayDeprecationWarning",
        "`ray_remote_args_fn` is deprecated",
        "isa embed caps a decode task's retries (pipelines.embed.decode_task_options); Ray 2.60 has no other way "
        "to set max_retries on a map task that is not deprecated",
    ),
    (
        "builtins",
        "UserWarning",
        "The maximum number of concurrent tasks for 'MapBatches(write_shard)'",
        "isa embed's shard writers are capped at two; Ray warns whenever a run has fewer shards than that",
    ),
    (
        "builtins",
        "UserWarning",
        "The maximum number of concurrent tasks for 'MapBatches(_",
        "the tasks listing and reading isa embed's inputs are capped at two (pipelines.embed.sources.SOURCE_TASKS); "
        "Ray warns whenever an input gives fewer blocks than that",
    ),
    (
        "builtins",
        "UserWarning",
        "Grad strides do not match bucket view strides",
        "isa train on more than one worker (DDP): the token learner's 1x1 projection gets a weight gradient whose "
        "strides differ from its bucket's only along the kernel's size-1 dimensions, the same memory order, so "
        "nothing is impaired; torch compares the strides themselves",
    ),
)
# Ray Data's console notices about its own progress display, which name DataContext fields a user of isa does
# not set (ISA_PROGRESS is the switch)
_RAY_DATA_NOTICES = (
    "Progress bars disabled",
    "Progress will be logged because",
    "[dataset]: A new progress UI is available",
)


class _DropMessages(logging.Filter):
    """Leaves out the records whose message starts with one of ``starts``."""

    def __init__(self, starts: Iterable[str]) -> None:
        super().__init__()
        self.starts = tuple(starts)

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


class _PlainText(logging.Filter):
    """Removes terminal escape sequences from a record's message (Ray colors the dashboard's address)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\x1b" in message:
            record.msg, record.args = _ESCAPE.sub("", message), None
        return True


def progress_wanted(environ: Mapping[str, str] | None = None, streams: Iterable[TextIO] | None = None) -> bool:
    """Whether to draw progress bars: ``ISA_PROGRESS`` when set, else whether every stream is a terminal.

    Raises:
        ConfigError: ``ISA_PROGRESS`` holds something other than 1/0 (true/false, yes/no, on/off).
    """
    value = (os.environ if environ is None else environ).get(PROGRESS_ENV, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    if value:
        raise ConfigError(f"{PROGRESS_ENV}={value!r}: use 1 (progress bars) or 0 (plain lines), or leave it unset")
    return all(_is_terminal(stream) for stream in (streams if streams is not None else (sys.stdout, sys.stderr)))


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def configure(progress: bool | None = None) -> bool:
    """Set the driver's output before Ray starts; returns whether progress bars are drawn.

    Args:
        progress: draw Ray Data's progress bars; None: :func:`progress_wanted`.

    Raises:
        ConfigError: an invalid ``ISA_PROGRESS``.
    """
    import ray.data

    progress = progress_wanted() if progress is None else progress
    if not progress:
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # read by the driver as it prints the workers' lines
        _add_filter(logging.getLogger("ray._private.worker"), _PlainText())
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    context.print_on_execution_start = False
    _quiet_ray_data_notices()
    silence_dependency_warnings()
    return progress


def without_progress_bars(datasets: dict[str, Any]) -> dict[str, Any]:
    """The datasets, set to draw no progress bars wherever they run (for datasets Ray Train reads in its workers)."""
    for dataset in datasets.values():
        dataset.context.enable_progress_bars = False
        dataset.context.print_on_execution_start = False
    return datasets


def quiet_worker() -> None:
    """In a Ray Train worker: no INFO lines from libraries (open_clip's model building, through the root logger
    that Ray Train sets to INFO), no Ray Data notices, and the silenced dependency warnings."""
    logging.getLogger().setLevel(logging.WARNING)
    _quiet_ray_data_notices()
    silence_dependency_warnings()


def silence_dependency_warnings() -> None:
    """Ignore :data:`DEPENDENCY_WARNINGS` in this process."""
    import importlib

    for module, name, message, _ in DEPENDENCY_WARNINGS:
        category = getattr(importlib.import_module(module), name)
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)


def _quiet_ray_data_notices() -> None:
    _add_filter(logging.getLogger("ray.data._internal.progress"), _DropMessages(_RAY_DATA_NOTICES))


def _add_filter(logger: logging.Logger, new: logging.Filter) -> None:
    if not any(type(f) is type(new) for f in logger.filters):  # once per process
        logger.addFilter(new)
