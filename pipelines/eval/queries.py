"""Query embeddings for ``isa eval``: student checkpoints and the teacher-only baselines.

Each method encodes its queries in one Ray task, on a GPU when the cluster has one, so the driver stays
light under ``ray job submit``. Reference images and checkpoints are read where the task runs (any fsspec URI).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import ray
import torch

from isa.augment import eval_view, views
from isa.build import build_teacher
from isa.checkpoint import find_checkpoint
from isa.config import TeacherConfig
from isa.query import QueryEncoder, student_views, text_queries


@dataclass
class Encoded:
    """One method's queries."""

    name: str  # row label
    queries: np.ndarray  # (Q, D) float32, L2-normalized
    attention: np.ndarray | None = None  # (R, M, h, w) for the first R references; None without spatial attention


def task_options() -> dict:
    """One GPU per encoding task when the cluster has GPUs, else up to 4 CPUs (torch threads) per task, never
    more than the largest live node holds (a task runs on one node).

    On CPUs, each task holds its own torch, teacher and student (about 1 GB): a few threads in one task use
    the cores as well as as many tasks would, with fewer copies in memory (one at a time on 2 CPUs).
    """
    if ray.cluster_resources().get("GPU", 0) > 0:
        return {"num_gpus": 1}
    largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=1)
    return {"num_cpus": min(4, max(1, int(largest)))}


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _read(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as handle:
        return handle.read()


def load_encoder(checkpoint: str, teacher: TeacherConfig, device: str) -> QueryEncoder:
    """The student of a checkpoint folder, read where this runs: a remote one is copied to a temporary folder of
    this process's machine (removed once loaded), so a task on any node of a cluster reads it."""
    from pipelines.eval import local_copy  # the package imports this module

    with tempfile.TemporaryDirectory(prefix="isa-eval-") as copies:
        local = str(find_checkpoint(local_copy(checkpoint, copies)))
        return QueryEncoder.from_checkpoint(local, build_teacher(teacher, device), device)


@ray.remote(max_retries=1)
def encode_text_baseline(teacher: TeacherConfig, modifiers: list[tuple[str, ...]], batch_size: int) -> np.ndarray:
    """Teacher text only, ``a photo of {c}``: (Q, D)."""
    model = build_teacher(teacher, _device())
    parts = [text_queries(model, modifiers[i : i + batch_size]) for i in range(0, len(modifiers), batch_size)]
    return torch.cat(parts).float().cpu().numpy()


@ray.remote(max_retries=1)
def encode_student(
    checkpoint: str,
    teacher: TeacherConfig,
    references: list[str] | list[bytes],
    query_refs: list[int],
    modifiers: list[tuple[str, ...]] | None,
    batch_size: int,
    report: int,
) -> Encoded:
    """A checkpoint's queries.

    Args:
        checkpoint: a checkpoint folder: a local path every node reads, or a URI (``s3://...``) this task copies from.
        references: unique reference image URIs (decoded as training decoded them), or cached student JPEGs.
        query_refs: for each query, its index in ``references``.
        modifiers: per query its modifier texts; None for image-only retrieval (``a photo of {S}``).
        report: keep the attention maps of the first ``report`` references.
    """
    device = _device()
    encoder = load_encoder(checkpoint, teacher, device)
    cached = bool(references) and isinstance(references[0], bytes)
    size = encoder.config.student.image_size
    sentences, attention = [], []
    for start in range(0, len(references), batch_size):
        chunk = references[start : start + batch_size]
        pixels = (
            views(chunk, eval_view(size), size) if cached else student_views([_read(u) for u in chunk], encoder.config)
        )
        out = encoder.sentences(pixels)
        sentences.append(out.sentence)  # (b, M, w)
        if out.attention is not None and start < report:
            attention.append(out.attention[: report - start].float().cpu())
    sentence = torch.cat(sentences)[torch.as_tensor(query_refs, device=device)]  # (Q, M, w)
    queries = []
    for start in range(0, sentence.shape[0], batch_size):
        part = sentence[start : start + batch_size]
        if modifiers is None:
            queries.append(encoder.image_only(part))
        else:
            queries.append(encoder.compose(part, modifiers[start : start + batch_size]))
    maps = torch.cat(attention).numpy() if attention else None
    return Encoded(encoder.name, torch.cat(queries).float().cpu().numpy(), maps)


def unique_references(references: Sequence[str]) -> tuple[list[str], list[int]]:
    """Each reference once, in first-seen order, and each query's index into that list."""
    order: dict[str, int] = {}
    index = [order.setdefault(name, len(order)) for name in references]
    return list(order), index
