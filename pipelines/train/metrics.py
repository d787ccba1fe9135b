"""What ``isa train`` records: the metric names, declared beside the functions that build each record.

Every record goes to MLflow and to the console as one line (:func:`step_line`), both from rank 0, and every
checkpoint's record to ``ray.train.report``, from which ``isa tune`` schedules trials; :func:`reported_metrics`
tells a sweep which names a run will report.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

from isa.config import Config

# the distillation task's terms (isa.task.DistillTask.forward), averaged over the steps since the last record
ALWAYS_LOSSES = ("loss", "gcd", "temperature")
WEIGHTED_LOSSES = {"lar": "lar_weight", "rel": "rel_weight", "word": "word_weight"}  # name -> loss.* weight (> 0)
LR = "lr"
SAMPLES_PER_S = "samples_per_s"  # from the end of the first step (start-up excluded), all workers together
INPUT_WAIT = "input_wait_fraction"  # share of the time since the last record spent waiting for a batch
VALIDATION = {"R@1": "val_image_R1", "R@5": "val_image_R5"}  # image-only recall on the held-out split (rank 0)
STEP = "step"  # in every checkpoint's report


def record(losses: Mapping[str, float], lr: float, samples_per_s: float, input_wait: float) -> dict[str, float]:
    """One record: the averaged losses, the learning rate, the throughput and the input wait."""
    return {**losses, LR: lr, SAMPLES_PER_S: samples_per_s, INPUT_WAIT: input_wait}


def step_line(step: int, total: int, record: Mapping[str, float], steps_per_s: float, checkpoint: bool) -> str:
    """The line ``isa train`` prints for a record: step, losses, throughput, time left; at a checkpoint the
    held-out recall too. For example ``step 20/40 · loss 4.08 (gcd 3.09, lar 3.31) · 118 samples/s · ETA 0:00:12``.

    Args:
        step, total: the step just taken and the run's last.
        record: :func:`record`'s losses and throughput, with :func:`validation_record`'s names at a checkpoint.
        steps_per_s: the run's optimizer steps per second (0: not measured yet).
        checkpoint: a checkpoint was saved at this step.
    """
    terms = ", ".join(f"{name} {record[name]:#.3g}" for name in ("gcd", *WEIGHTED_LOSSES) if name in record)
    parts = [f"step {step}/{total}", f"loss {record['loss']:#.4g}" + (f" ({terms})" if terms else "")]
    rate = record.get(SAMPLES_PER_S, 0.0)
    parts.append(f"{rate:.0f} samples/s" if rate > 0 else "samples/s –")
    left = (total - step) / steps_per_s if steps_per_s > 0 else None
    parts.append(f"ETA {datetime.timedelta(seconds=round(left))}" if left is not None else "ETA –")
    recall = [f"{label} {record[key]:.1f}" for label, key in VALIDATION.items() if key in record]
    if recall:
        parts.append("val " + ", ".join(recall))
    if checkpoint:
        parts.append("checkpoint")
    return " · ".join(parts)


def validation_record(recall: Mapping[str, float]) -> dict[str, float]:
    """The held-out recall (``isa.retrieval.image_retrieval_recall``'s ``R@K`` keys) under the reported names."""
    return {VALIDATION[k]: v for k, v in recall.items() if k in VALIDATION}


def reported_metrics(config: Config) -> list[str]:
    """The names every checkpoint's report of a run with ``config`` holds."""
    losses = [name for name, weight in WEIGHTED_LOSSES.items() if getattr(config.loss, weight) > 0]
    validated = config.train.val_fraction > 0 and config.train.val_images > 0
    validation = list(VALIDATION.values()) if validated else []
    return [*ALWAYS_LOSSES, LR, SAMPLES_PER_S, INPUT_WAIT, *validation, STEP, *losses]


# every name a report can hold, whatever the config
ALL = (*ALWAYS_LOSSES, *WEIGHTED_LOSSES, LR, SAMPLES_PER_S, INPUT_WAIT, *VALIDATION.values(), STEP)
