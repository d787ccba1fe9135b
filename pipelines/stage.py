"""What every stage shares: its arguments (``--config FILE`` plus dotted ``key=value`` overrides) and Ray.

Each stage module has the same face: ``parser()`` (its arguments), ``check(...)`` (every refusal before work
starts), ``run(...)`` (the work, returning its result) and ``main(argv)``; errors derive from
:class:`isa.errors.IsaError` and reach the user through :mod:`pipelines.cli`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from isa.config import Config

# "(section.key)" in an option's help: the config key the option sets (HelpFormatter shows that key's default)
_CONFIG_KEY = re.compile(r"\((" + "|".join(f.name for f in dataclasses.fields(Config)) + r")\.(\w+)\)")
_STATED = re.compile(r"\(default[: ]")  # a help that states its default itself


def _shown(value: object) -> str:
    """A default as the command line spells it (``key=value`` overrides included)."""
    if value is None or value == () or value == "":
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def help_default(action: argparse.Action) -> str | None:
    """What ``--help`` shows as an option's default; None where it shows none (``--help``, a required option or
    positional, the overrides, a help that states its default).

    A switch is ``off`` (``on`` for a ``store_false`` one); an option whose help names the config key it sets,
    ``(section.key)``, has that key's built-in default; any other its argparse default.
    """
    if action.default is argparse.SUPPRESS or action.required or _STATED.search(action.help or ""):
        return None
    if not action.option_strings and action.nargs != "?":
        return None
    if action.nargs == 0 and isinstance(action.const, bool):
        return "on" if action.default else "off"  # store_true / store_false
    key = _CONFIG_KEY.search(action.help or "")
    if key is not None and action.default is None:
        return _shown(getattr(getattr(Config(), key.group(1)), key.group(2)))
    return _shown(action.default)


class HelpFormatter(argparse.HelpFormatter):
    """Every stage's ``--help``: each option's help ends with ``(default: ...)``, from :func:`help_default`."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = help_default(action)
        text = action.help or ""
        return text if default is None else f"{text} (default: {default})".lstrip()


def stage_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the stages' :class:`HelpFormatter`."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def config_parser(prog: str, description: str, positionals: Sequence[tuple[str, str]] = ()) -> argparse.ArgumentParser:
    """A parser with the stage's positionals (name, help), ``--config`` and trailing ``key=value`` overrides.

    An option that sets a config key names it in its help, ``(section.key)``: ``--help`` then shows that key's
    built-in default.
    """
    parser = stage_parser(prog, description)
    for name, help_text in positionals:
        parser.add_argument(name, help=help_text)
    parser.add_argument(
        "--config", help="YAML file with any subset of the config sections (default: none, the built-in config)"
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.lr=1e-4")
    return parser


def ray_joined() -> bool:
    """Whether this process has joined a Ray instance; a process that has not imported Ray has not (and is not made
    to import it: a run without Ray never does)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


IDLE_WORKER_SECONDS = 5.0  # how long a worker process of a single-machine instance may stay idle


def init_ray(
    dashboard: bool | None = None, single_machine: bool = False, idle_worker_seconds: float = IDLE_WORKER_SECONDS
) -> None:
    """Join ``RAY_ADDRESS`` when set (e.g. under ``ray job submit``), else start a local instance; the console
    output is set first (:func:`pipelines.console.configure`: progress bars in a terminal, plain lines elsewhere).

    Ray Train starts no preemption watcher in a local instance: the watcher (a process per run, and an error line
    from Ray at its start) waits for cluster nodes being drained, which a local instance never has.

    Args:
        dashboard: whether a local instance starts Ray's dashboard (None: when its packages are installed).
        single_machine: a local instance sized for one small machine (the quickstart): a worker process idle
            for ``idle_worker_seconds`` exits instead of staying (Ray keeps one per CPU, each holding what its
            tasks imported).
        idle_worker_seconds: how long a worker process of a single-machine instance may stay idle (Ray's
            ``idle_worker_killing_time_threshold_ms``); ignored otherwise.
    """
    import ray

    from pipelines.console import configure, progress_wanted

    progress = progress_wanted()  # an invalid ISA_PROGRESS is refused, even where Ray runs already
    if ray.is_initialized():
        return
    configure(progress)  # progress bars or plain lines, before Ray starts
    local = not os.environ.get("RAY_ADDRESS")
    if local:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # read by Ray Train's controller
    if local and single_machine:
        idle_ms = round(idle_worker_seconds * 1000)
        system = {"num_workers_soft_limit": 0, "idle_worker_killing_time_threshold_ms": idle_ms}
        ray.init(include_dashboard=dashboard, _system_config=system)
    else:
        ray.init(include_dashboard=dashboard)


@contextlib.contextmanager
def data_context(**settings: Any) -> Iterator[None]:
    """Ray Data's current ``DataContext`` with ``settings`` (its field names) while datasets are made, as it was
    after: each dataset keeps the context it was made with, the datasets made later get the defaults again."""
    import ray.data

    context = ray.data.DataContext.get_current()
    before = {name: getattr(context, name) for name in settings}
    for name, value in settings.items():
        setattr(context, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(context, name, value)
