"""`isa` is the method in pure PyTorch: importing it never pulls in Ray or MLflow."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import isa


def test_isa_and_every_submodule_leave_ray_and_mlflow_out():
    modules = sorted(m.name for m in pkgutil.walk_packages(isa.__path__, prefix="isa."))
    assert "isa.teacher" in modules and "isa.students.registry" in modules and "isa.data.synthetic" in modules
    script = (
        "import importlib, sys\n"
        f"for name in {['isa', *modules]!r}:\n"
        "    importlib.import_module(name)\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'))\n"
        "print(leaked)\n"
        "sys.exit(1 if leaked else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_what_ray_helpers_unpickle_leaves_torch_out():
    # Ray Train's controller and Ray Data's coordinator import these modules; data tasks run the views
    script = (
        "import sys, pipelines.train_remote, isa.augment\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'open_clip', 'timm', 'mlflow') if m in sys.modules)\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
