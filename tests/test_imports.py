"""The layering of the packages: ``isa`` (pure PyTorch) <- ``pipelines`` (Ray stages) <- ``tune``, the ``isa``
command above them all; light drivers and Ray helpers; private Ray modules in one place."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import isa

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("isa", "pipelines", "tune")


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
    # unpickles the backend and the entry point (pipelines.train), Ray Data's coordinators the views and the tower;
    # data tasks run the views, the embed stage's decode and write tasks and its ledger actor
    modules = [
        "pipelines.embed",
        "pipelines.train",
        "pipelines.quickstart",
        "tune.sweep",
        "pipelines.ray_compat",
        "pipelines.tracking",
        "pipelines.train.data",
        "pipelines.train.metrics",
        "pipelines.teacher",
        "pipelines.embed.tower",
        "isa.augment",
        "isa.images",
        "pipelines.embed.decode",
    ]
    result = leaked(modules, ("torch", "torchvision", "open_clip", "timm", "mlflow"))
    assert result.returncode == 0, result.stdout + result.stderr


def imported_names(path: Path) -> set[str]:
    """The modules a file imports anywhere (top level or in a function), and ``module.name`` of each from-import."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def imports() -> dict[str, set[str]]:
    """Every module of the three packages and what it imports."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = imported_names(path)
    return found


def test_packages_import_only_the_layers_below_them():
    allowed = {"isa": {"isa"}, "pipelines": {"isa", "pipelines"}, "tune": {"isa", "pipelines", "tune"}}
    graph = imports()
    assert {"pipelines.cli", "pipelines.train.loop", "tune.sweep", "isa.task"} <= set(graph)
    wrong = {
        module: sorted(n for n in names if n.split(".")[0] in PACKAGES and n.split(".")[0] not in allowed[layer])
        for module, names in graph.items()
        for layer in [module.split(".")[0]]
    }
    assert {m: n for m, n in wrong.items() if n} == {}
    # the dispatcher names the stages of every layer as strings and imports only the one asked for
    from pipelines.cli import STAGES

    assert {module.split(".")[0] for module, _ in STAGES.values()} == {"pipelines", "tune"}


def private_ray(name: str) -> bool:
    """``ray._private.x``, ``ray.train.v2._internal.y``, ``ray.m._f``: a part after ``ray`` starting with ``_``."""
    parts = name.split(".")
    return parts[0] == "ray" and any(part.startswith("_") for part in parts[1:])


def test_private_ray_modules_are_imported_by_the_compatibility_module_only():
    assert private_ray("ray._private.worker") and private_ray("ray.train.v2._internal.util")
    assert not private_ray("ray.train.torch") and not private_ray("ray.util.placement_group.PlacementGroup")
    users = {m for m, names in imports().items() if any(private_ray(n) for n in names)}
    assert users == {"pipelines.ray_compat"}
    files = [*(REPO / "tests").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]
    assert [str(p.relative_to(REPO)) for p in files if any(private_ray(n) for n in imported_names(p))] == []
