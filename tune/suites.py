"""Ablation suites: named YAML files under ``tune/suites/`` (or any YAML path), one row per setting compared.

A suite file::

    name: tokens                                  # the suite's name (default: the file name)
    description: Sentence length M (docs/method.md §6)
    swept: token_learner.num_tokens               # the plot's x axis: a dotted key the rows set, or a label
    metric: image_R@1                             # the plotted column of the table (default image_R@1)
    base:                                         # config sections under the user's --config and overrides
      teacher: {name: ViT-L-14, pretrained: openai}
    rows:                                         # in table order; names unique
      - name: M=1
        set: {token_learner.num_tokens: 1}        # dotted config overrides, applied last
        value: 1                                  # optional x value (default: the row's `swept` value, else its name)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tune.space import SweepError

SUITES_DIR = Path(__file__).with_name("suites")
SUITE_KEYS = {"name", "description", "swept", "metric", "base", "rows"}
ROW_KEYS = {"name", "set", "value"}


@dataclass(frozen=True)
class Row:
    """One setting of a suite."""

    name: str  # label in the table, the plot and MLflow
    overrides: dict[str, Any]  # dotted config key -> value
    value: str  # the x value in the plot


@dataclass(frozen=True)
class Suite:
    """A named list of rows over a base config."""

    name: str
    description: str
    swept: str  # what the rows vary (the plot's x axis)
    metric: str  # the plotted column
    base: dict[str, Any]  # config sections applied under the user's config
    rows: tuple[Row, ...]


def available() -> list[str]:
    """Names of the suites shipped in ``tune/suites/``."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def load_suite(name_or_path: str) -> Suite:
    """A shipped suite by name, or a suite YAML file by path.

    Raises:
        SweepError: no such suite, or a malformed one (naming the problem).
    """
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") or path.is_file()):
        path = SUITES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise SweepError(f"no ablation suite {name_or_path!r}: choose one of {available()} or give a suite YAML path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SweepError(f"suite {path} is not valid YAML: {error}") from None
    if not isinstance(data, Mapping):
        raise SweepError(f"suite {path} must hold a mapping with 'rows:', got {type(data).__name__}")
    unknown = set(data) - SUITE_KEYS
    if unknown:
        raise SweepError(f"suite {path}: unknown keys {sorted(unknown)}; valid keys: {sorted(SUITE_KEYS)}")
    rows = data.get("rows")
    if not isinstance(rows, list) or not rows:
        raise SweepError(f"suite {path} has no rows: give 'rows:' a list of {{name, set}} entries")
    swept = str(data.get("swept", ""))
    parsed = tuple(_row(path, i, row, swept) for i, row in enumerate(rows))
    names = [r.name for r in parsed]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise SweepError(f"suite {path}: row name {duplicate!r} is used twice")
    base = data.get("base") or {}
    if not isinstance(base, Mapping):
        raise SweepError(f"suite {path}: 'base:' must be a mapping of config sections")
    return Suite(
        name=str(data.get("name") or path.stem),
        description=str(data.get("description", "")),
        swept=swept or "row",
        metric=str(data.get("metric", "image_R@1")),
        base=dict(base),
        rows=parsed,
    )


def _row(path: Path, index: int, row: Any, swept: str) -> Row:
    if not isinstance(row, Mapping) or "name" not in row:
        raise SweepError(f"suite {path}: row {index + 1} must be a mapping with a 'name' and a 'set' of overrides")
    unknown = set(row) - ROW_KEYS
    if unknown:
        raise SweepError(f"suite {path}: row {row['name']!r} has unknown keys {sorted(unknown)}; valid: {ROW_KEYS}")
    overrides = row.get("set") or {}
    if not isinstance(overrides, Mapping):
        raise SweepError(f"suite {path}: row {row['name']!r}: 'set' must map dotted config keys to values")
    value = row.get("value", overrides.get(swept, row["name"]))
    return Row(name=str(row["name"]), overrides=dict(overrides), value=str(value))
