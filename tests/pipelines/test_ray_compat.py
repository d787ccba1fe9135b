"""``pipelines.ray_compat``, the one module on Ray's private API: the Ray versions it was checked against, and
what each of its pieces does on a real local Ray instance (the trainer's callbacks: ``test_local_ray.py``; the
placement-group records of ``isa tune``: ``tests/tune``; the launcher and packaging rules: ``tests/infra``)."""

from __future__ import annotations

import time

import ray

from pipelines import ray_compat


def test_the_installed_ray_is_one_this_module_was_checked_against():
    assert ray.__version__ in ray_compat.CHECKED_RAY, (
        f"Ray {ray.__version__} is installed; pipelines/ray_compat.py was checked against {ray_compat.CHECKED_RAY}: "
        "check each private import there against this version, then add it"
    )


def test_actor_dead_tells_a_live_actor_from_a_killed_one(ray_session):
    @ray.remote(num_cpus=0)
    class Probe:
        def actor_id(self) -> str:
            return ray.get_runtime_context().get_actor_id()

    probe = Probe.remote()
    actor_id = ray.get(probe.actor_id.remote())
    assert ray_compat.actor_dead(actor_id) is False
    ray.kill(probe)
    deadline = time.monotonic() + 30
    while not ray_compat.actor_dead(actor_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_compat.actor_dead(actor_id) is True
    assert ray_compat.actor_dead("") is False  # no id recorded: never taken for dead


def test_job_dead_tells_this_live_job_from_one_that_ended(ray_session):
    import subprocess
    import sys

    assert ray_compat.job_dead(ray.get_runtime_context().get_job_id()) is False
    assert ray_compat.job_dead("") is False
    code = "import sys, ray; ray.init(address=sys.argv[1]); print(ray.get_runtime_context().get_job_id())"
    done = subprocess.run([sys.executable, "-c", code, ray_session], capture_output=True, text=True, timeout=120)
    ended = done.stdout.split()[-1]
    deadline = time.monotonic() + 30
    while not ray_compat.job_dead(ended) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_compat.job_dead(ended) is True


def test_without_a_dashboard_the_session_reports_none_in_the_driver_and_in_a_worker(ray_session):
    """A worker (a Tune trial starting Ray Train) too: there Ray's own ``get_dashboard_url`` gives its default
    address, which started a placement-group cleaner with each trial's run that could never reach a state API."""

    @ray.remote(num_cpus=0)
    def in_a_worker() -> bool:
        return ray_compat.has_dashboard()

    assert ray_compat.has_dashboard() is False  # the test instance starts without one (conftest)
    assert ray.get(in_a_worker.remote()) is False
