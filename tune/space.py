"""The search space of a sweep: dotted config keys mapped to value specifications, checked before any trial.

A sweep file's ``space:`` maps dotted config keys to one spec each::

    space:
      token_learner.num_tokens: {grid: [1, 4, 16]}   # every value (search=grid); sampled like choice otherwise
      student.backbone: {choice: [efficientnet_b0, mobilenetv3_large_100]}
      loss.lar_weight: {uniform: [0.0, 1.0]}
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}
      token_learner.depth: {randint: [1, 3]}          # both ends included

Every key and every value (each listed value, both ends of a range, and every combination of the listed values)
goes through :mod:`isa.config`, so an unknown key or a value of the wrong type fails with the config's own error,
naming the key, before Ray Tune starts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from isa.config import Config, ConfigError, from_dict
from isa.errors import IsaError
from pipelines.train import metrics as train_metrics

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
LISTED = ("grid", "choice")  # kinds whose values are listed; the others take [low, high]
MAX_CHECKED_COMBINATIONS = 4096  # listed-value combinations checked one by one (beyond that: each value alone)

TUNE_METRICS = ("training_iteration", "time_total_s", "time_this_iter_s")  # Tune's own counters in every result


class SweepError(IsaError):
    """A sweep or suite that cannot start; the message names the problem."""


@dataclass(frozen=True)
class Param:
    """One swept key: ``kind`` is one of :data:`KINDS`; ``values`` the listed values or ``(low, high)``."""

    key: str  # dotted config key, e.g. "train.lr"
    kind: str
    values: tuple[Any, ...]


def parse_space(space: Any, base: Config) -> list[Param]:
    """The swept parameters of a ``space:`` mapping, each checked against ``base``.

    Raises:
        SweepError: an empty space, a malformed spec, a swept ``tune.*`` key.
        ConfigError: an unknown key or a value the config refuses (the message names the key).
    """
    if not space:
        raise SweepError("the sweep's space is empty: give 'space:' a mapping of dotted config keys to specs")
    if not isinstance(space, Mapping):
        raise SweepError(f"the sweep's space must map dotted config keys to specs, got {space!r}")
    params = [_parse_param(str(key), spec) for key, spec in space.items()]
    check_params(params, base)
    return params


def _parse_param(key: str, spec: Any) -> Param:
    section, dot, name = key.partition(".")
    if not dot or not section or not name:
        raise SweepError(f"space key {key!r} is not a dotted config key such as train.lr")
    if section == "tune":
        raise SweepError(f"space key {key!r}: the tune section configures the sweep itself and cannot be swept")
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise SweepError(f"space key {key!r}: expected one of {{{'|'.join(KINDS)}: [...]}}, got {spec!r}")
    ((kind, values),) = spec.items()
    if kind not in KINDS:
        raise SweepError(f"space key {key!r}: unknown spec {kind!r}; valid specs: {list(KINDS)}")
    if not isinstance(values, list | tuple) or not values:
        raise SweepError(f"space key {key!r}: {kind} needs a non-empty list, got {values!r}")
    if kind not in LISTED:
        if len(values) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise SweepError(f"space key {key!r}: {kind} needs [low, high] numbers, got {values!r}")
        low, high = values
        if not low <= high or (kind == "loguniform" and low <= 0) or (kind == "randint" and not _all_int(values)):
            rule = {"loguniform": "0 < low <= high", "randint": "integers low <= high"}.get(kind, "low <= high")
            raise SweepError(f"space key {key!r}: {kind} needs {rule}, got {values!r}")
    return Param(key, kind, tuple(values))


def _all_int(values: Any) -> bool:
    return all(isinstance(v, int) for v in values)


def check_params(params: list[Param], base: Config) -> None:
    """Apply every listed value, both ends of each range and the listed combinations to ``base``.

    Raises:
        ConfigError: from :func:`isa.config.from_dict`, naming the key.
    """
    keys = [p.key for p in params]
    for param in params:  # each value alone first: the clearest error for a bad key or value
        for value in param.values:
            from_dict(nested({param.key: value}), base=base)
    candidates = [p.values for p in params]
    if math.prod(len(c) for c in candidates) <= MAX_CHECKED_COMBINATIONS:
        for combination in itertools.product(*candidates):  # cross-key rules, e.g. token_learner.dim % heads
            from_dict(nested(dict(zip(keys, combination))), base=base)
    for param in params:
        if param.key == "student.backbone":
            check_students(param.values)


def check_students(names: Any) -> None:
    """Refuse student names the registry does not know (``student.backbone`` values; None or one name or a list).

    Raises:
        ConfigError: naming the key, the unknown names and the registered ones.
    """
    from isa.students import list_students

    names = [] if names is None else [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in list_students()]
    if unknown:
        raise ConfigError(f"config key 'student.backbone': {unknown} not registered; choose one of {list_students()}")


def nested(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"train.lr": 1e-3}`` -> ``{"train": {"lr": 1e-3}}`` (the form :func:`isa.config.from_dict` takes)."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = plain(value)
    return out


def plain(value: Any) -> Any:
    """Python scalars for numpy scalars (Tune's samplers return numpy integers and floats)."""
    return value.item() if isinstance(value, np.generic) else value


def param_space(params: list[Param], search: str) -> dict[str, dict[str, Any]]:
    """Ray Tune's nested ``param_space``: ``grid`` becomes ``grid_search`` with ``search=grid``, else ``choice``."""
    from ray import tune

    def domain(param: Param) -> Any:
        low, high = param.values[0], param.values[-1]
        if param.kind == "grid" and search == "grid":
            return tune.grid_search(list(param.values))
        if param.kind in LISTED:
            return tune.choice(list(param.values))
        if param.kind == "randint":
            return tune.randint(low, high + 1)  # Tune's upper end is exclusive
        return tune.loguniform(low, high) if param.kind == "loguniform" else tune.uniform(low, high)

    out: dict[str, dict[str, Any]] = {}
    for param in params:
        section, _, name = param.key.partition(".")
        out.setdefault(section, {})[name] = domain(param)
    return out


def reported_metrics(config: Config) -> list[str]:
    """The metrics every trial of ``config`` reports to Tune (the train stage's, plus Tune's counters)."""
    return [*train_metrics.reported_metrics(config), *TUNE_METRICS]


def check_metric(config: Config, params: list[Param]) -> None:
    """Refuse a ``tune.metric`` that some trial would never report.

    Raises:
        SweepError: naming the metric and the ones that are reported.
    """
    metric = config.tune.metric
    always = set(reported_metrics(config))
    for param in params:  # a loss term reported only when its weight is > 0 must be on in every trial
        name = next((n for n, w in train_metrics.WEIGHTED_LOSSES.items() if param.key == f"loss.{w}"), None)
        if name and min(param.values) <= 0:
            always.discard(name)
    if metric not in always:
        raise SweepError(
            f"tune.metric={metric!r} is never reported by the train stage for every trial of this sweep; "
            f"it reports: {sorted(always)}"
        )
