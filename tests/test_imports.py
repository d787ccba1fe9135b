"""`isa` is the method in pure PyTorch: importing it never pulls in Ray or MLflow."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import isa


def leaked(modules: list[str], heavy: tuple[str, ...]) -> subprocess.CompletedProcess:
    """Import ``modules`` in a fresh interpreter; exit status 1 and the list printed if any of ``heavy`` came in."""
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"leaked = sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})\n"
        "print(leaked)\n"
        "sys.exit(1 if leaked else 0)\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def test_isa_and_every_submodule_leave_ray_and_mlflow_out():
    modules = sorted(m.name for m in pkgutil.walk_packages(isa.__path__, prefix="isa."))
    assert "isa.teacher" in modules and "isa.students.registry" in modules and "isa.data.synthetic" in modules
    result = leaked(["isa", *modules], ("ray", "mlflow"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_drivers_ray_helpers_and_data_tasks_leave_torch_out():
    # the drivers of embed, train, tune and the quickstart (before its evaluation); Ray Train's controller
    # unpickles the backend and train_remote, Ray Data's coordinators train_remote and the teacher operator;
    # data tasks run the views, the embed stage's decode and write tasks and its ledger actor
    modules = [
        "pipelines.embed",
        "pipelines.train",
        "pipelines.quickstart",
        "tune.sweep",
        "pipelines.train_backend",
        "pipelines.train_remote",
        "pipelines.embed_teacher",
        "isa.augment",
        "isa.images",
        "pipelines.embed_ops",
    ]
    result = leaked(modules, ("torch", "torchvision", "open_clip", "timm", "mlflow"))
    assert result.returncode == 0, result.stdout + result.stderr
