"""Image-only retrieval for ``isa eval --benchmark images`` (docs/method.md §5, distillation fidelity).

The held-out images of a training cache (the same id-hash split ``isa train`` validates on) are queried as
``a photo of {S}`` against the teacher embeddings of the same images: R@1/5/10.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from isa.cache import fingerprint_mismatch, list_parts, read_manifest
from isa.config import Config
from isa.retrieval import image_retrieval_recall
from isa.split import is_validation
from isa.storage import filesystem
from isa.teacher import Teacher
from pipelines.eval.gallery import EvalError
from pipelines.eval.queries import encode_student, task_options


def held_out(cache: str, fraction: float, limit: int) -> tuple[list[bytes], torch.Tensor]:
    """At most ``limit`` held-out rows, file by file (never the whole cache in memory): JPEGs and (N, D)."""
    fs, root = filesystem(cache)
    images: list[bytes] = []
    embeddings: list[np.ndarray] = []
    for part in list_parts(fs, root):
        with fs.open(part, "rb") as handle:
            table = pq.read_table(handle, columns=["id", "image", "teacher_emb"])
        rows = [i for i, image_id in enumerate(table["id"].to_pylist()) if is_validation(image_id, fraction)]
        rows = rows[: limit - len(images)]
        if rows:
            part_table = table.take(rows)
            images += part_table["image"].to_pylist()
            emb = part_table["teacher_emb"].combine_chunks()
            embeddings.append(emb.flatten().to_numpy(zero_copy_only=False).reshape(len(rows), -1))
        if len(images) >= limit:
            break
    if not images:
        raise EvalError(f"cache {cache} has no held-out images (train.val_fraction={fraction})")
    return images, torch.from_numpy(np.concatenate(embeddings)).float()


def image_only_document(config: Config, teacher: Teacher, checkpoints: list[str]) -> dict:
    """R@1/5/10 of each checkpoint on the held-out images of the cache at ``eval.dataset_root``."""
    cache = config.eval.dataset_root or config.train.cache
    fs, root = filesystem(cache)
    manifest = read_manifest(fs, root)
    if manifest is None or manifest.image_size is None:
        raise EvalError(f"image-only retrieval needs a cache with images at {cache} (made by isa embed)")
    mismatch = fingerprint_mismatch(teacher.fingerprint(), manifest.teacher)
    if mismatch:
        raise EvalError(f"cache {cache} does not match the configured teacher: {mismatch}")
    if not checkpoints:
        raise EvalError("image-only retrieval needs at least one checkpoint (eval.checkpoints)")
    images, gallery = held_out(cache, config.train.val_fraction, config.train.val_images)
    index = list(range(len(images)))
    batch = config.eval.batch_size
    pending = [
        encode_student.options(**task_options()).remote(path, config.teacher, images, index, None, batch, 0)
        for path in checkpoints
    ]
    rows = {}
    for encoded in ray.get(pending):
        queries = torch.tensor(encoded.queries)  # a copy: arrays from the object store are read-only
        rows[encoded.name] = image_retrieval_recall(queries, gallery, ks=(1, 5, 10))
    return {
        "benchmark": "images",
        "split": "held-out",
        "gallery_cache": cache,
        "gallery_size": len(images),
        "queries": len(images),
        "rows": rows,
    }
