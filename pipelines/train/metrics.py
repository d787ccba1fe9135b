"""What ``isa train`` records: the metric names, declared beside the functions that build each record.

Every record goes to MLflow (rank 0) and every checkpoint's record to ``ray.train.report``, from which
``isa tune`` schedules trials; :func:`reported_metrics` tells a sweep which names a run will report.
"""

from __future__ import annotations

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
