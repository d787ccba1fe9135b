"""Placement groups of stopped trials: the Tune driver removes what a killed Train controller leaves behind.

When ASHA stops a trial, Tune ends the trial's driver and, with it, the trial's Ray Train controller, which never
gets to remove the placement group of its workers. Ray Train's own ``PlacementGroupCleaner`` removes it only
when Ray's State API (the dashboard) answers; without the dashboard the trial's CPUs and GPUs stay reserved until
the job ends, and on a small cluster the next trial waits forever (ray-project/ray#58515, #65447). Ray Tune with
Train V1 kept track of these groups in the Tune driver; this module does the same:

- :class:`RecordPlacementGroups`, a Ray Train callback in each trial, writes the ids of its controller and of
  every worker placement group into the trial folder (``.isa_placement_groups/PG_ID``, content: controller id);
- :class:`ReleasePlacementGroups`, a Ray Tune callback in the sweep driver, removes a recorded group once its
  controller is dead (asked of the GCS directly, no dashboard needed) and its trial has ended, or when the trial
  starts again in a resumed sweep (its earlier controller died with the killed sweep driver; asked again for a
  while until the GCS knows it dead). The groups that controller's ended job left go with it, recorded or not.
"""

from __future__ import annotations

import posixpath
import time
from typing import Any

import ray
from ray.tune import Callback
from ray.util.placement_group import PlacementGroup

from isa.storage import filesystem, write_bytes
from pipelines.ray_compat import ControllerCallback, WorkerGroupCallback, actor_dead, job_dead, placement_group_of

RECORDS = ".isa_placement_groups"  # in a trial folder
CHECK_EVERY_S = 1.0  # how often the Tune driver looks for groups to release
RECHECK_STARTED_S = 120.0  # how long a trial started again is looked at for its earlier controllers' groups


class RecordPlacementGroups(ControllerCallback, WorkerGroupCallback):
    """Train callback (runs in the controller): record the controller's id and each worker placement group."""

    def __init__(self, trial_folder: str):
        self.trial_folder = trial_folder
        self.controller_id: str | None = None

    def after_controller_start(self, train_run_context: Any) -> None:
        self.controller_id = ray.get_runtime_context().get_actor_id()

    def after_worker_group_start(self, worker_group: Any) -> None:
        group = placement_group_of(worker_group)
        fs, path = filesystem(posixpath.join(self.trial_folder, RECORDS, group.id.hex()))
        write_bytes(fs, path, (self.controller_id or "").encode())


class ReleasePlacementGroups(Callback):
    """Tune callback (runs in the sweep driver): release the groups of ended trials whose controller is dead."""

    def __init__(self, folder: str):
        self.folder = folder
        self._checked = 0.0
        self._done: set[str] = set()  # ended trials found with no group left: not listed again until the end
        self._started: dict[str, float] = {}  # trials started again with a live recorded controller -> when

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # a trial started again (its sweep resumed after the driver was killed): the groups of its earlier
        # controllers, dead with that driver, can still hold their CPUs (Ray may leave them when its job ends);
        # a controller the GCS does not know dead yet is asked again for a while
        if release(self.folder, [trial.trial_id]):
            self._started[trial.trial_id] = time.monotonic()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self._checked < CHECK_EVERY_S:
            return
        self._checked = time.monotonic()
        ended = [t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR") and t.trial_id not in self._done]
        self._done.update(set(ended) - release(self.folder, ended))
        for trial_id, started in list(self._started.items()):
            if time.monotonic() - started > RECHECK_STARTED_S or not release(self.folder, [trial_id]):
                del self._started[trial_id]

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        release(self.folder, [t.trial_id for t in trials])


def release(folder: str, trial_ids: list[str]) -> set[str]:
    """Remove the recorded placement groups of these trials whose controller is dead; returns the trials that still
    hold a recorded group (its controller alive).

    A controller whose job has ended (the killed sweep driver's) may have made a group it never recorded: its
    worker group started again, and the job ended before the new group's workers were up. Every group of such a
    job that is still there goes too: the job's own groups end with it, so what is left of them is leaked.
    """
    from ray.util.placement_group import placement_group_table, remove_placement_group

    held: set[str] = set()
    ended_jobs: set[str] = set()  # hex ids of the jobs of dead recorded controllers that have ended
    fs, root = filesystem(folder)
    for trial_id in trial_ids:
        records = posixpath.join(root, trial_id, RECORDS)
        fs.invalidate_cache(records)  # an object store's listing remembered from an earlier call misses new records
        for record in fs.glob(posixpath.join(records, "*")):
            group = recorded_group(posixpath.basename(record))
            controller = fs.cat_file(record).decode()
            gone = placement_group_table(group).get("state") in (None, "REMOVED")
            if not actor_dead(controller):  # kept while its controller lives: its job may end with more groups
                if not (gone and not controller):  # (a record naming no controller: only while its group is)
                    held.add(trial_id)
                    continue
            elif job_dead(job := ray.ActorID.from_hex(controller).job_id.hex()):
                ended_jobs.add(job)
            if not gone:
                remove_placement_group(group)
            fs.rm(record)
    for group_id, entry in placement_group_table().items() if ended_jobs else ():
        if entry["state"] != "REMOVED" and group_id.endswith(tuple(ended_jobs)):
            remove_placement_group(recorded_group(group_id))
    return held


def recorded_group(name: str) -> PlacementGroup:
    """The placement group a record names (its file name: the group's id in hex)."""
    return PlacementGroup(ray.PlacementGroupID(bytes.fromhex(name)))
