"""tune/cleanup.py on a real local Ray: the placement group a dead Train controller left is released when its trial
starts again; a live controller's is kept."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
from ray.util.placement_group import placement_group, placement_group_table

from pipelines.ray_compat import actor_dead
from tune.cleanup import RECORDS, RecordPlacementGroups, ReleasePlacementGroups, recorded_group


def _kill(controller: ray.actor.ActorHandle, record: Path) -> None:
    """Kill a controller and wait until the GCS knows it dead (``ray.kill`` returns before), as the release asks
    it: by the controller id its record holds."""
    ray.kill(controller)
    deadline = time.monotonic() + 60
    while not actor_dead(record.read_text()):
        assert time.monotonic() < deadline, "the GCS never knew the killed controller dead"
        time.sleep(0.1)


def test_a_trial_started_again_releases_its_dead_controllers_group_not_a_live_controllers(ray_session, tmp_path):
    @ray.remote(num_cpus=0)
    class Controller:
        """Records a worker placement group as a trial's Ray Train controller does, and holds it."""

        def start(self, trial_folder: str) -> str:
            recorder = RecordPlacementGroups(trial_folder)
            recorder.after_controller_start(None)
            self.group = placement_group([{"CPU": 0.5}])
            ray.get(self.group.ready(), timeout=60)
            state = SimpleNamespace(placement_group_handle=SimpleNamespace(placement_group=self.group))
            recorder.after_worker_group_start(SimpleNamespace(get_worker_group_state=lambda: state))
            return self.group.id.hex()

    dead, live = Controller.remote(), Controller.remote()
    dead_group = ray.get(dead.start.remote(str(tmp_path / "t1")))
    live_group = ray.get(live.start.remote(str(tmp_path / "t2")))
    assert sorted(p.name for p in (tmp_path / "t1" / RECORDS).iterdir()) == [dead_group]
    _kill(dead, tmp_path / "t1" / RECORDS / dead_group)  # as the killed sweep driver's job ends: its group stays
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(dead.__ray_ready__.remote())

    def state(group: str) -> str:
        return placement_group_table(recorded_group(group))["state"]

    assert state(dead_group) == "CREATED"
    release = ReleasePlacementGroups(str(tmp_path))
    for trial_id in ("t1", "t2"):  # each trial starts again in the resumed sweep
        release.on_trial_start(0, [], SimpleNamespace(trial_id=trial_id))
    assert state(dead_group) == "REMOVED" and not list((tmp_path / "t1" / RECORDS).iterdir())
    assert state(live_group) == "CREATED" and [p.name for p in (tmp_path / "t2" / RECORDS).iterdir()] == [live_group]
    _kill(live, tmp_path / "t2" / RECORDS / live_group)  # then that one too (nothing stays reserved in the session)
    release.on_trial_start(0, [], SimpleNamespace(trial_id="t2"))
    assert state(live_group) == "REMOVED"
