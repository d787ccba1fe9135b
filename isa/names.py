"""The names a config takes (students, teacher models), known without importing torch or open_clip.

:mod:`isa.config` checks every name against these lists when a config is built, so a wrong name is refused by
``isa config`` and by every stage before any work starts, in a driver that never loads a model. The lists are
read from where the builders take them: the student registry's built-in names (and any student registered in
this process, :func:`isa.students.register_student`), and open_clip's model configs (its ``model_configs``
folder, the project's ``isa/model_configs``, and any added with ``open_clip.add_model_config`` in this process).
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

# The backbones of docs/method.md §2, all checked to return a (B, C, h, w) map from forward_features.
BACKBONES: tuple[str, ...] = (
    "efficientnet_b0",
    "efficientnet_b2",
    "mobilenetv3_large_100",
    "mobilenetv2_100",
    "efficientvit_m2",
    "efficientvit_b1",
)
DEFAULT_BACKBONE = "efficientnet_b0"
SYMMETRIC = "symmetric"  # the student that reads the teacher's own patch features (docs/method.md §2)
PROJECT_CONFIGS = "isa.model_configs"  # small open_clip configs shipped with the project
SCHEMA_PREFIXES = ("hf-hub:", "local-dir:")  # model names open_clip resolves itself (downloaded or a folder)


def student_names() -> list[str]:
    """Every student ``create_student`` builds: the built-in ones and any registered in this process."""
    registry = sys.modules.get("isa.students.registry")  # loaded by whoever registers a student of their own
    registered = registry.list_students() if registry is not None else []
    return sorted({*BACKBONES, SYMMETRIC, *registered})


def _config_folders() -> list[Path]:
    folders = [Path(str(resources.files(PROJECT_CONFIGS)))]
    spec = importlib.util.find_spec("open_clip")  # finds the package without importing it (and torch)
    if spec is not None and spec.submodule_search_locations:
        folders.append(Path(next(iter(spec.submodule_search_locations))) / "model_configs")
    return folders


@functools.lru_cache(maxsize=1)
def _shipped_configs() -> dict[str, Path]:
    """Model name -> config file, as open_clip scans them (later folders do not replace earlier names)."""
    found: dict[str, Path] = {}
    for folder in _config_folders():
        for path in sorted(folder.glob("*.json")):
            found.setdefault(path.stem, path)
    return found


def teacher_names() -> list[str]:
    """Every teacher model name known here: open_clip's and the project's configs, and any added in this process."""
    names = set(_shipped_configs())
    factory = sys.modules.get("open_clip.factory")
    if factory is not None:
        names.update(factory.list_models())
    return sorted(names)


@functools.lru_cache(maxsize=64)
def _read_config(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def teacher_model_config(name: str) -> dict[str, Any] | None:
    """The open_clip config of a model name, or None when the name is not known here."""
    path = _shipped_configs().get(name)
    if path is not None:
        return _read_config(path)
    factory = sys.modules.get("open_clip.factory")
    return factory.get_model_config(name) if factory is not None else None


def is_project_config(name: str) -> bool:
    """Whether the model is one of the project's own small configs (random init or a weights file, no tags)."""
    path = _shipped_configs().get(name)
    return path is not None and path.parent == _config_folders()[0]


def close_matches(name: str, names: list[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest known names, or ``""``."""
    found = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(n) for n in found)}?)" if found else ""
