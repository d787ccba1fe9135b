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
from tune.cleanup import CHECK_EVERY_S, RECORDS, RecordPlacementGroups, ReleasePlacementGroups, recorded_group


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
    # the GCS knows that controller dead only later (as a killed job's may be): the trial is asked again
    _kill(live, tmp_path / "t2" / RECORDS / live_group)
    time.sleep(CHECK_EVERY_S)
    release.on_step_end(0, [SimpleNamespace(trial_id="t2", status="RUNNING")])
    assert state(live_group) == "REMOVED" and not list((tmp_path / "t2" / RECORDS).iterdir())


ENDED_DRIVER = """
import sys
from types import SimpleNamespace

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from tune.cleanup import RecordPlacementGroups

ray.init(address=sys.argv[1], log_to_driver=False)


@ray.remote(num_cpus=0)
class Controller:
    def start(self, trial_folder):
        recorder = RecordPlacementGroups(trial_folder)
        recorder.after_controller_start(None)
        first = placement_group([{"CPU": 0.25}])
        ray.get(first.ready(), timeout=60)
        state = SimpleNamespace(placement_group_handle=SimpleNamespace(placement_group=first))
        recorder.after_worker_group_start(SimpleNamespace(get_worker_group_state=lambda: state))
        remove_placement_group(first)  # its worker group starts again, and the job ends before it is recorded:
        again = placement_group([{"CPU": 0.25}], lifetime="detached")  # a group that outlives the job, unrecorded
        ray.get(again.ready(), timeout=60)
        return again.id.hex()


print(ray.get(Controller.remote().start.remote(sys.argv[2])), flush=True)
"""


def test_a_group_the_ended_sweep_job_never_recorded_is_released_when_its_trial_starts_again(ray_session, tmp_path):
    """The killed sweep driver's controller started its worker group again and the job ended before the new group
    was recorded (seen in the interrupted-sweep test: the resumed trial's data tasks then waited for good): the
    groups that job left go when the trial starts again; the groups of this live job stay."""
    import subprocess
    import sys

    from pipelines.ray_compat import job_dead

    mine = placement_group([{"CPU": 0.25}])  # this (live) job's own group
    ray.get(mine.ready(), timeout=60)
    done = subprocess.run(
        [sys.executable, "-c", ENDED_DRIVER, ray_session, str(tmp_path / "t1")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    left = done.stdout.split()[-1]
    (record,) = (tmp_path / "t1" / RECORDS).iterdir()
    controller = record.read_text()
    job = ray.ActorID.from_hex(controller).job_id.hex()
    deadline = time.monotonic() + 60
    while not (actor_dead(controller) and job_dead(job)):
        assert time.monotonic() < deadline, "the GCS never knew the ended job's controller dead"
        time.sleep(0.1)

    def state(group: str) -> str:
        return placement_group_table(recorded_group(group))["state"]

    assert left.endswith(job) and state(left) == "CREATED" and state(record.name) == "REMOVED"
    ReleasePlacementGroups(str(tmp_path)).on_trial_start(0, [], SimpleNamespace(trial_id="t1"))
    assert state(left) == "REMOVED" and not list((tmp_path / "t1" / RECORDS).iterdir())
    assert state(mine.id.hex()) == "CREATED"
    ray.util.remove_placement_group(mine)
