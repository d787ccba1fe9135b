"""``isa ablate``: every row of a suite trained through the train stage, evaluated through the eval stage, tabulated.

The rows run as the trials of a Ray Tune grid over the row names (:mod:`tune.sweep`, no scheduler: every row
trains to its end), so they share the sweep's folder layout, concurrency, resume and MLflow nesting. Then each
row's final checkpoint goes through ``isa eval``: image-only retrieval on the training cache's held-out split
always, and the configured CIR benchmark when ``eval.dataset_root`` is set. The query-side cost of each row comes
from :mod:`pipelines.eval.cost`. Written to the suite folder and logged on the MLflow parent run:
``ablation_NAME.md``, ``ablation_NAME.csv`` and ``ablation_NAME.png`` (the suite's metric per row).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import posixpath
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isa.build import build_teacher
from isa.checkpoint import find_checkpoint
from isa.config import Config, from_dict, to_dict
from isa.storage import filesystem, write_bytes
from pipelines.stage import config_parser, init_ray
from pipelines.tracking import ui_command
from tune import plot, tracking
from tune.space import SweepError, check_students, nested
from tune.suites import Suite, load_suite
from tune.sweep import (
    SWEEP_FILE,
    Outcome,
    Plan,
    TrialRecord,
    check_sweep_folder,
    check_training,
    check_training_start,
    folder_of,
    load_plan,
    load_sweep_file,
    resume,
    start,
    tracking_uri_of,
    trial_config,
)

INFO_COLUMNS = ["row", "value", "status", "trial_id", "mlflow_run_id", "steps"]
IMAGE_COLUMNS = ["val_image_R1", "image_R@1", "image_R@5", "image_R@10"]  # train's last validation; isa eval's
COST_COLUMNS = ["params_M", "gflops", "cpu_latency_ms"]


@dataclass(frozen=True)
class Ablation:
    """A finished suite: its rows (one mapping of column -> value each) and the files written."""

    suite: Suite
    outcome: Outcome
    columns: list[str]
    rows: list[dict[str, Any]]
    files: dict[str, str]  # file name -> URI


def load(suite: str, config_path: str | None, overrides: Sequence[str]) -> tuple[Suite, Config]:
    """The suite and its base config: the suite's ``base:``, then the user's file, then the overrides.

    Raises:
        SweepError: no such suite, a malformed suite, a ``space:`` in the config file.
        ConfigError: an unknown key or bad value in the suite's base, the file or the overrides.
    """
    found = load_suite(suite)
    config, space = load_sweep_file(config_path, overrides, base=from_dict(found.base))
    if space:
        raise SweepError(f"{config_path} has a 'space:' (a sweep for isa tune); isa ablate takes a plain config")
    return found, config


def check(suite: Suite, config: Config) -> Plan:
    """Check every row against the config, the cache and the cluster before any row trains: :func:`check_start`,
    then the checks that need the cluster (the teacher's fingerprint, one row's resources).

    Raises:
        as :func:`check_start`; TrainError: a mismatched cache, or a cluster too small for one row.
    """
    plan = check_start(suite, config)
    check_training(plan.config)
    return plan


def check_start(suite: Suite, config: Config) -> Plan:
    """The refusals that need no cluster, made before Ray starts: the rows, the benchmark, the metric, the suite
    folder (new, empty or this suite's), the train stage's own (its settings and its cache).

    Raises:
        ConfigError: a row sets an unknown key or a value the config refuses (naming the key).
        BenchmarkFormatError: the configured CIR benchmark (``eval.dataset_root``) cannot be read.
        TrainError: a missing cache, or one without what the rows need.
        ArtifactError: a suite folder holding other things.
    """
    rows = {}
    for row in suite.rows:
        bad = next((k for k in row.overrides if "." not in k.strip(".")), None)
        if bad:
            raise SweepError(f"suite {suite.name}: row {row.name!r} sets {bad!r}, not a dotted key such as train.lr")
        rows[row.name] = nested(row.overrides)
        from_dict(rows[row.name], base=config)  # ConfigError naming the key
        check_students(row.overrides.get("student.backbone"))
    ev = config.eval
    cir = bool(ev.dataset_root) and ev.benchmark != "images"
    if cir:  # the CIR benchmark is read now, not after the training
        from isa.data.benchmarks import read_benchmark

        read_benchmark(ev.benchmark, ev.dataset_root, ev.split)
    if suite.metric not in IMAGE_COLUMNS + COST_COLUMNS and not (cir and suite.metric.startswith(f"{ev.benchmark}_")):
        known = IMAGE_COLUMNS + COST_COLUMNS + ([f"{ev.benchmark}_METRIC"] if cir else [])
        raise SweepError(f"suite {suite.name}: metric {suite.metric!r} is not a column of its table; columns: {known}")
    folder = folder_of(config, f"ablation-{suite.name}")
    check_sweep_folder(folder, "ablation suite")
    tracking_uri = tracking_uri_of(config, folder)
    config = trial_config(config, tracking_uri)
    check_training_start(config)
    return Plan("ablation", config, folder, tracking_uri, rows=json.loads(json.dumps(rows)), suite=suite.name)


def run(suite: Suite, config: Config) -> Ablation:
    """Train (or resume) every row, evaluate it, write and log the table, CSV and plot."""
    plan = check(suite, config)
    fs, path = filesystem(plan.folder)
    if fs.exists(posixpath.join(path, SWEEP_FILE)):  # the same suite again: finished rows are not retrained
        stored = load_plan(plan.folder)
        if (stored.kind, to_dict(stored.config), stored.rows) != (plan.kind, to_dict(plan.config), plan.rows):
            raise SweepError(
                f"{plan.folder} holds another run of suite {suite.name} (other config or rows): "
                "set tune.name or tune.storage for a new one"
            )
        outcome = resume(plan.folder, kind="ablation")
    else:
        outcome = start(plan, {"suite": suite.name, "rows": len(suite.rows)})
    plan = outcome.plan
    try:
        ablation = _tabulate(suite, outcome)
    except BaseException:
        tracking.end(plan.tracking_uri, plan.parent_run_id, "FAILED")
        raise
    tracking.end(plan.tracking_uri, plan.parent_run_id)
    return ablation


def _tabulate(suite: Suite, outcome: Outcome) -> Ablation:
    plan = outcome.plan
    by_name = {t.name: t for t in outcome.trials}
    trials = [by_name.get(row.name) for row in suite.rows]
    metrics = [evaluate(plan, t) if t is not None and t.status == "completed" else {} for t in trials]
    costs, teacher = row_costs(plan, trials)
    rows = [{**_info(row, t), **found, **cost} for row, t, found, cost in zip(suite.rows, trials, metrics, costs)]
    metric_columns = list(dict.fromkeys(["val_image_R1", *(k for found in metrics for k in found)]))
    columns = INFO_COLUMNS + metric_columns + COST_COLUMNS
    files = write_outputs(suite, plan, columns, rows, teacher)
    for row, trial in zip(rows, trials):
        if trial is not None and trial.run_id:
            values = {k: row[k] for k in metric_columns + COST_COLUMNS if _finite(row.get(k))}
            for key, value in values.items():
                tracking.client(plan.tracking_uri).log_metric(trial.run_id, f"ablation/{_metric_key(key)}", value)
    return Ablation(suite, outcome, columns, rows, files)


def _info(row: Any, trial: TrialRecord | None) -> dict[str, Any]:
    """A row's identity and training columns (a row without a trial is "missing")."""
    if trial is None:
        return {"row": row.name, "value": row.value, "status": "missing", "steps": math.nan, "val_image_R1": math.nan}
    return {
        "row": row.name,
        "value": row.value,
        "status": trial.status,
        "trial_id": trial.trial_id,
        "mlflow_run_id": trial.run_id or "",
        "steps": trial.metrics.get("step", math.nan),
        "val_image_R1": trial.metrics.get("val_image_R1", math.nan),
    }


def evaluate(plan: Plan, trial: TrialRecord) -> dict[str, float]:
    """The row's checkpoint through ``isa eval``: image-only retrieval always, the configured CIR benchmark too."""
    from pipelines import eval as eval_stage
    from pipelines.eval.outputs import split_name

    config = from_dict(plan.rows[trial.name], base=plan.config)
    common = {
        "checkpoints": [trial.run_dir],
        "baselines": False,
        "latency_runs": 0,  # the cost is measured once for all rows (row_costs)
        "tracking_uri": plan.tracking_uri,
        "run_id": trial.run_id,
    }
    out_dir = posixpath.join(plan.folder, trial.trial_id)
    images = {**common, "benchmark": "images", "dataset_root": config.train.cache, "split": "held-out"}
    images["output"] = posixpath.join(out_dir, "eval-images")
    document = eval_stage.run(from_dict({"eval": images}, base=config))
    found = {f"image_{k}": float(v) for k, v in _only_row(document).items()}
    ev = config.eval
    if ev.dataset_root and ev.benchmark != "images":
        gallery = ev.gallery_cache or posixpath.join(plan.folder, f"gallery-{ev.benchmark}-{split_name(config)}")
        cir = {**common, "gallery_cache": gallery, "output": posixpath.join(out_dir, f"eval-{ev.benchmark}")}
        document = eval_stage.run(from_dict({"eval": cir}, base=config))
        found |= {f"{ev.benchmark}_{k}": float(v) for k, v in _only_row(document).items()}
    return found


def _only_row(document: dict) -> dict[str, float]:
    (metrics,) = document["rows"].values()  # one checkpoint, no baselines: one row
    return metrics


def row_costs(plan: Plan, trials: list[TrialRecord | None]) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Query-side cost of each row's student at CPU batch 1 (empty for a row without a checkpoint), and the
    teacher image tower's, measured once for all rows."""
    from pipelines.eval import local_copy
    from pipelines.eval.cost import query_costs

    done = [t for t in trials if t is not None and t.status == "completed"]
    teacher = build_teacher(plan.config.teacher)
    runs = max(1, plan.config.eval.latency_runs)
    # a run folder on object storage: its latest checkpoint copied here (below the row's folder when that is local)
    local = [find_checkpoint(local_copy(t.run_dir, posixpath.join(plan.folder, t.trial_id))) for t in done]
    measured = query_costs(teacher, [str(path) for path in local], runs, plan.config.eval.latency_threads)
    by_trial = {t.trial_id: c for t, c in zip(done, measured[1:])}
    costs = [by_trial.get(t.trial_id) if t is not None else None for t in trials]
    return [_cost_columns(c) if c else {} for c in costs], _cost_columns(measured[0])


def _cost_columns(cost: Any) -> dict[str, float]:
    return {"params_M": cost.params / 1e6, "gflops": cost.gflops, "cpu_latency_ms": cost.latency_ms}


def write_outputs(
    suite: Suite, plan: Plan, columns: list[str], rows: list[dict], teacher: dict[str, float]
) -> dict[str, str]:
    """``ablation_NAME.{md,csv,png}`` in the suite folder, and as artifacts of the MLflow parent run."""
    stem = f"ablation_{suite.name}"
    contents = {
        f"{stem}.md": markdown(suite, plan, columns, rows, teacher).encode(),
        f"{stem}.csv": table_csv(columns, rows).encode(),
        f"{stem}.png": plot.bar_chart(
            [str(r["value"]) for r in rows],
            [float(r.get(suite.metric, math.nan)) for r in rows],
            title=f"isa ablation: {suite.name}",
            xlabel=suite.swept,
            ylabel=suite.metric,
        ),
    }
    fs, folder = filesystem(plan.folder)
    files = {}
    with tempfile.TemporaryDirectory() as local:
        for name, data in contents.items():
            write_bytes(fs, posixpath.join(folder, name), data)
            files[name] = posixpath.join(plan.folder, name)
            (Path(local) / name).write_bytes(data)
        tracking.log_files(plan.tracking_uri, plan.parent_run_id, [str(Path(local) / n) for n in contents])
    return files


def table_csv(columns: list[str], rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if _nan(row.get(k)) else row.get(k, "") for k in columns})
    return buffer.getvalue()


def markdown(suite: Suite, plan: Plan, columns: list[str], rows: list[dict], teacher: dict[str, float]) -> str:
    """The suite's table: one line per row, metrics and query-side cost; the teacher tower's cost below."""
    shown = ["value", "status", "steps"] + [c for c in columns if c not in INFO_COLUMNS]
    lines = [
        f"# Ablation: {suite.name}",
        "",
        suite.description,
        "",
        f"Rows differ in `{suite.swept}`; base config in `{posixpath.join(plan.folder, SWEEP_FILE)}`; "
        f"metrics in percent; cost at CPU batch 1. MLflow parent run `{plan.parent_run_id}`.",
        "",
        "| row | " + " | ".join(shown) + " |",
        "|---|" + "---:|" * len(shown),
    ]
    lines += [f"| {r['row']} | " + " | ".join(_cell(r.get(c)) for c in shown) + " |" for r in rows]
    if teacher:
        lines += [
            "",
            f"Teacher image tower ({plan.config.teacher.name}): "
            + ", ".join(f"{k} {_cell(v)}" for k, v in teacher.items()),
        ]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4g}"
    return "–" if value in (None, "") else str(value)


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _metric_key(name: str) -> str:
    from pipelines.eval.outputs import metric_key

    return metric_key(name)


def parser() -> argparse.ArgumentParser:
    """``isa ablate``'s arguments."""
    parser = config_parser("isa ablate", "Run an ablation suite: train, evaluate and tabulate every row.")
    parser.add_argument("--suite", required=True, help="a suite in tune/suites (tokens, losses, ...) or a YAML path")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    suite, config = load(args.suite, args.config, args.overrides)
    check_start(suite, config)
    init_ray()
    result = run(suite, config)
    table = result.files.get(f"ablation_{suite.name}.md")
    if table:
        fs, path = filesystem(table)
        print(fs.cat_file(path).decode())
    for name, uri in result.files.items():
        print(f"{name}: {uri}")
    uri = result.outcome.plan.tracking_uri
    print(f"MLflow: parent run {result.outcome.plan.parent_run_id} in {uri}; see it with: {ui_command(uri)}")
    return 0
