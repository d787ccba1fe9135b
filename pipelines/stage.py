"""What every stage shares: its arguments (``--config FILE`` plus dotted ``key=value`` overrides) and Ray.

Each stage module has the same face: ``parser()`` (its arguments), ``check(...)`` (every refusal before work
starts), ``run(...)`` (the work, returning its result) and ``main(argv)``; errors derive from
:class:`isa.errors.IsaError` and reach the user through :mod:`pipelines.cli`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence


def config_parser(prog: str, description: str, positionals: Sequence[tuple[str, str]] = ()) -> argparse.ArgumentParser:
    """A parser with the stage's positionals (name, help), ``--config`` and trailing ``key=value`` overrides."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, help_text in positionals:
        parser.add_argument(name, help=help_text)
    parser.add_argument("--config", help="YAML file with any subset of the config sections")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.lr=1e-4")
    return parser


def init_ray(dashboard: bool | None = None, single_machine: bool = False) -> None:
    """Join ``RAY_ADDRESS`` when set (e.g. under ``ray job submit``), else start a local instance.

    Args:
        dashboard: whether a local instance starts Ray's dashboard (None: when its packages are installed).
        single_machine: a local instance sized for one small machine (the quickstart): a worker process idle
            for 5 s exits instead of staying (Ray keeps one per CPU, each holding what its tasks imported),
            and Ray Train starts no preemption watcher (it watches for cluster nodes being drained).
    """
    import ray

    if ray.is_initialized():
        return
    if single_machine and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # read by Ray Train's controller
        system = {"num_workers_soft_limit": 0, "idle_worker_killing_time_threshold_ms": 5000}
        ray.init(include_dashboard=dashboard, _system_config=system)
    else:
        ray.init(include_dashboard=dashboard)
