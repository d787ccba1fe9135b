"""What ``isa eval`` writes: ``metrics.json``, a Markdown table, test-server files and MLflow records."""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from isa.config import Config, flatten
from isa.cost import GPU_BATCH
from isa.data.benchmarks import file_split
from isa.storage import filesystem, write_bytes
from pipelines import tracking

METRICS_FILE = "metrics.json"
TABLE_FILE = "table.md"
REPORT_FILE = "report.html"
SUBMISSIONS_DIR = "submissions"
# the teacher-only baseline rows
TEXT_ONLY, IMAGE_ONLY, IMAGE_TEXT = "text only (teacher)", "image only (teacher)", "image + text (teacher)"


def split_name(config: Config) -> str:
    """The split every output of an evaluation is named by (gallery cache, MLflow run and files, report): the
    split as the benchmark's files name it, e.g. CIRR ``test1`` for ``--split test``."""
    return file_split(config.eval.benchmark, config.eval.split)


def slug(name: str) -> str:
    """A file-name-safe form of a row label."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_json(uri: str, value: object) -> None:
    fs, path = filesystem(uri)
    write_bytes(fs, path, json.dumps(value, indent=2).encode())


def write_text(uri: str, text: str) -> None:
    fs, path = filesystem(uri)
    write_bytes(fs, path, text.encode())


def write_submissions(output: str, files: Mapping[str, Mapping[str, dict]]) -> dict[str, list[str]]:
    """``{row: {file name: content}}`` under ``OUTPUT/submissions/<row>/``; returns the URIs per row."""
    written: dict[str, list[str]] = {}
    for row, contents in files.items():
        for name, content in contents.items():
            uri = posixpath.join(output, SUBMISSIONS_DIR, slug(row), name)
            write_json(uri, content)
            written.setdefault(row, []).append(uri)
    return written


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def metrics_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] | None = None) -> str:
    """Markdown: one line per row label, one column per metric (the first row's order)."""
    if not rows:
        return ""
    columns = list(columns or dict.fromkeys(k for metrics in rows.values() for k in metrics))
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(_cell(m.get(c)) for c in columns) + " |" for name, m in rows.items()]
    return "\n".join(lines)


def versus(latency_ms: float, base_ms: float) -> str:
    """A path's median latency against the first path's (the teacher image tower): ``2.5× faster`` or ``3.1× slower``
    (``same`` within 5 %); ``–`` when either was not measured."""
    if latency_ms <= 0 or base_ms <= 0:
        return "–"
    ratio = base_ms / latency_ms
    if abs(ratio - 1) < 0.05:
        return "same"
    return f"{ratio:.1f}× faster" if ratio > 1 else f"{1 / ratio:.1f}× slower"


def cost_table(costs: Sequence[Mapping]) -> str:
    """Markdown: each query image path's parameters, GFLOPs, CPU batch-1 latency (median and fastest, all paths
    timed interleaved) and how it compares with the first path's (:func:`versus`; the first row is that path),
    and the GPU batch latency where one was measured.

    ``costs``: ``isa.cost.Cost`` fields as dicts (a metrics document's ``cost``).
    """
    if not costs:
        return ""
    base = costs[0]["latency_ms"]
    threads = costs[0].get("threads")
    cpu = f"CPU batch 1, {threads} threads" if threads else "CPU batch 1"
    gpu = any(c.get("gpu_batch_ms") is not None for c in costs)
    header = f"| query image path | params (M) | GFLOPs | {cpu}: median ms | fastest ms | vs teacher (median) |"
    rule = "|---|---:|---:|---:|---:|---:|"
    if gpu:
        header += f" GPU batch {GPU_BATCH}, bf16 (ms) |"
        rule += "---:|"
    lines = [header, rule]
    for i, c in enumerate(costs):
        compared = "–" if i == 0 else versus(c["latency_ms"], base)
        line = (
            f"| {c['name']} | {c['params'] / 1e6:.2f} | {c['gflops']:.3f} | {c['latency_ms']:.2f} | "
            f"{_cell(c.get('latency_min_ms'))} | {compared} |"
        )
        lines.append(line + (f" {_cell(c.get('gpu_batch_ms'))} |" if gpu else ""))
    return "\n".join(lines)


def document_table(document: Mapping) -> str:
    """The whole Markdown summary of a metrics document."""
    parts = [f"## {document['benchmark']} {document['split']} · gallery {document['gallery_size']} images"]
    if document["rows"]:
        parts.append(metrics_table(document["rows"]))
    for count, rows in document.get("scaling", {}).items():
        parts.append(f"### gallery + {count} distractors\n\n" + metrics_table(rows))
    if document.get("cost"):
        parts.append("### query-side cost\n\n" + cost_table(document["cost"]))
    return "\n\n".join(parts) + "\n"


def metric_key(name: str) -> str:
    """MLflow-safe metric name (it allows letters, digits, ``_ - . /`` and spaces)."""
    name = name.replace("@", "_at_").replace("+", "_plus_").replace("(", "").replace(")", "")
    return re.sub(r"[^\w\-./ ]", "_", name)


@dataclass(frozen=True)
class Record:
    """The MLflow run ``isa eval`` records into, and its store: records go through an outbox, so the evaluation
    goes on while MLflow does not answer (:class:`pipelines.tracking.Outbox`)."""

    uri: str
    outbox: tracking.Outbox

    @property
    def run_id(self) -> str | None:
        """The run (None: MLflow never answered; the records are kept in ``OUTPUT/mlflow-unsent``)."""
        return self.outbox.run_id


@contextmanager
def mlflow_run(config: Config) -> Iterator[Record | None]:
    """The run the evaluation records into, for the block that evaluates (None: not tracked).

    The store is :func:`pipelines.tracking.eval_tracking`'s. ``eval.run_id`` (e.g. the training run) is recorded
    into and left as it is; else a new run in ``eval.experiment``, tagged with the first checkpoint's training
    run (``isa.training_run_id``) and its parameters, ends with the block: FINISHED, FAILED or KILLED. At the end
    MLflow gets at most ``eval.tracking_wait_s`` to take the records; the rest are kept in the output folder.
    """
    where = tracking.eval_tracking(config.eval.tracking_uri, config.eval.checkpoints, config.eval.output)
    if where.uri is None:
        yield None
        return
    outbox = tracking.Outbox(where.uri, config.eval.run_id, "isa eval")
    new = config.eval.run_id is None
    if new:
        tags = {tracking.TRAINING_RUN_TAG: where.run_id} if where.run_id else {}
        outbox.create_run(config.eval.experiment, f"eval-{config.eval.benchmark}-{split_name(config)}", tags)
        outbox.params(flatten(config))
    status = "FINISHED"
    try:
        yield Record(where.uri, outbox)
    except Exception:
        status = "FAILED"
        raise
    except BaseException:
        status = "KILLED"
        raise
    finally:
        if new:
            outbox.put({"op": "terminate", "status": status})
        outbox.close(config.eval.tracking_wait_s, config.eval.output)


def log_mlflow(config: Config, record: Record | None, document: Mapping, files: Mapping[str, str]) -> None:
    """Log metrics (``eval/BENCHMARK/row/metric``) and the output files into the run (nothing when not tracked)."""
    if record is None:
        return
    prefix = f"eval/{config.eval.benchmark}/"
    metrics = {
        metric_key(f"{prefix}{slug(row)}/{name}"): float(value)
        for row, values in document["rows"].items()
        for name, value in values.items()
    }
    record.outbox.metrics(metrics)
    artifact_path = f"eval-{config.eval.benchmark}-{split_name(config)}"
    for name, text in files.items():
        record.outbox.put({"op": "text", "file": name, "text": text, "artifact_path": artifact_path})
