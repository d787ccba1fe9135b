"""Every use of Ray beyond its public API, in one place, checked against the Ray versions named in
:data:`CHECKED_RAY` (``tests/pipelines/test_ray_compat.py`` fails on any other version, so an upgrade starts
here).

What is here, and why a public API does not do it:
- :class:`Trainer`: Ray Train's ``DataParallelTrainer``, without the placement-group cleaner where the cluster runs
  no dashboard. The cleaner is a detached actor that asks the state API (served by the dashboard) whether the
  run's controller is alive; without a dashboard it can never know, warns every few seconds for the whole run
  and holds a process (about 120 MB). Ray offers no setting to leave it out.
- :class:`ControllerCallback`, :class:`WorkerGroupCallback`: Ray Train V2's callback interfaces for the
  controller and its worker groups, through which ``isa tune`` records each trial's placement groups
  (:mod:`tune.cleanup`). Ray exports only ``UserCallback`` publicly, which sees neither.
- :data:`RUN_SNAPSHOT_FILE`: the file in a run folder from which Ray Train restores a run (its checkpoint
  manager's snapshot); ``isa train`` tells a folder that holds a run by it. Ray names it in a private module only.
- :func:`actor_dead`: whether the GCS knows an actor as dead, asked without the dashboard (the public
  ``ray.util.state`` API needs it).
- :func:`check_cluster_config` and :func:`working_dir_excludes`: what ``ray up`` does to a cluster launcher
  config and what ``ray job submit --working-dir`` leaves out of the package, so the tests of ``infra/`` check
  the shipped files with Ray's own rules.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

CHECKED_RAY = ("2.60.0",)  # versions whose private modules this file was checked against
RUN_SNAPSHOT_FILE: str = CHECKPOINT_MANAGER_SNAPSHOT_FILENAME  # in a Ray Train run folder: what restores the run

__all__ = [
    "CHECKED_RAY",
    "ControllerCallback",
    "RUN_SNAPSHOT_FILE",
    "WorkerGroupCallback",
    "actor_dead",
    "check_cluster_config",
    "Trainer",
    "has_dashboard",
    "placement_group_of",
    "working_dir_excludes",
]


def has_dashboard() -> bool:
    """Whether the connected cluster runs Ray's dashboard (and with it the state API), in a driver or in a worker
    process (a Tune trial starting Ray Train): the address its head records in the GCS. A worker's own idea of it
    (``ray.get_dashboard_url()``) is Ray's default address even where no dashboard runs."""
    from ray._private.services import get_webui_url_from_internal_kv

    return bool(get_webui_url_from_internal_kv())


class Trainer(DataParallelTrainer):
    """Ray Train's ``DataParallelTrainer``, without the placement-group cleaner where the cluster has no dashboard."""

    def _create_default_callbacks(self) -> list:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

        callbacks = super()._create_default_callbacks()
        if has_dashboard():
            return callbacks
        return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]


def actor_dead(actor_id: str) -> bool:
    """Whether the GCS knows this actor (hex id) as dead; False when it cannot tell."""
    from ray._private.state import actors

    try:
        return bool(actor_id) and actors(actor_id=actor_id).get("State") == "DEAD"
    except Exception:
        return False


def job_dead(job_id: str) -> bool:
    """Whether the GCS knows this job (hex id) as ended; False when it cannot tell."""
    from ray._private.state import jobs

    try:
        return any(job.get("JobID") == job_id and job.get("IsDead") for job in jobs())
    except Exception:
        return False


def placement_group_of(worker_group: Any) -> ray.util.placement_group.PlacementGroup:
    """The placement group of a Ray Train worker group (as :class:`WorkerGroupCallback` receives it)."""
    return worker_group.get_worker_group_state().placement_group_handle.placement_group


def check_cluster_config(config: dict) -> None:
    """Ray's own filling-in and validation of a cluster launcher config (what ``ray up`` runs first).

    Raises:
        ValueError, KeyError, jsonschema.ValidationError: as Ray raises them for an invalid config.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


def working_dir_excludes(root: Path, excludes: list[str]) -> Callable[[Path], bool]:
    """Whether ``ray job submit --working-dir ROOT`` with the runtime environment's ``excludes`` leaves a path out."""
    from ray._private.runtime_env.packaging import _get_excludes

    return _get_excludes(root, excludes)
