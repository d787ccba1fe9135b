"""The quickstart's local Ray instance for a small machine, against Ray's defaults, each in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, os, sys, time
sys.path.insert(0, os.path.join(sys.argv[2], "benchmarks"))
import ray
from peak_memory import descendants, process_name
from pipelines.ray_compat import Trainer
from pipelines.stage import init_ray

single_machine = sys.argv[1] == "1"
init_ray(dashboard=False if single_machine else None, single_machine=single_machine, idle_worker_seconds=0.5)

@ray.remote
def work(i):
    import numpy as np  # something the worker keeps once imported
    return int(np.arange(i).sum())

ray.get([work.remote(i) for i in range(8)])

def idle_workers():
    return [pid for pid in descendants(os.getpid()) if process_name(pid).startswith("ray::IDLE")]

time.sleep(2.5)  # five times the single-machine idle limit set above, longer than Ray's own default of 1 s
deadline = time.monotonic() + 60  # a busy machine: the idle workers of a single-machine instance go in the end
while single_machine and idle_workers() and time.monotonic() < deadline:
    time.sleep(0.2)
workers = idle_workers()
trainer = Trainer(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
callbacks = trainer._create_default_callbacks()
print(json.dumps({
    "idle_workers": len(workers),
    "cleaner": any(type(c).__name__ == "PlacementGroupCleanerCallback" for c in callbacks),
    "preemption_watcher": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"),
}))
ray.shutdown()
"""


def _local_instance(single_machine: bool) -> dict:
    unset = ("RAY_ADDRESS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, "1" if single_machine else "0", str(REPO)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("single_machine", [False, True])
def test_single_machine_instance_lets_idle_workers_go_and_starts_no_idle_watchers(single_machine):
    found = _local_instance(single_machine)
    assert found["preemption_watcher"] == "0"  # a local instance: no node is ever drained
    if single_machine:  # no dashboard: no placement-group cleaner (it could never reach the state API)
        assert found == {"idle_workers": 0, "cleaner": False, "preemption_watcher": "0"}
    else:  # Ray's defaults with a dashboard: idle workers stay (up to one per CPU), the cleaner runs
        assert found["idle_workers"] >= 1 and found["cleaner"] is True


def test_data_context_settings_hold_while_datasets_are_made_and_go_after_even_on_an_error():
    import ray.data

    from pipelines.stage import data_context

    context = ray.data.DataContext.get_current()
    before = (context.target_max_block_size, context.use_datasource_v2)
    with pytest.raises(ValueError), data_context(target_max_block_size=1234, use_datasource_v2=not before[1]):
        assert (context.target_max_block_size, context.use_datasource_v2) == (1234, not before[1])
        raise ValueError("a dataset that could not be made")
    assert (context.target_max_block_size, context.use_datasource_v2) == before
