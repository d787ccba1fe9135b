"""The input of ``isa train``: the cache's shards as one Ray Data stream of student views and teacher targets.

cache shards (all the run's passes, each in its own order) -> keep one split (the id hash of :mod:`isa.split`)
-> decode and augment each JPEG (CPU tasks) -> per-worker shards of ``view`` (uint8 HWC), ``teacher_emb`` and
``teacher_local`` rows.

Ray Data's coordinator actors unpickle :func:`split_and_view` by module and name, so this module imports
nothing heavy: those long-lived processes stay small (about 120 MB each instead of 570 MB with torch). The data
tasks need PIL and NumPy alone.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import ray.data

from isa.cache import Manifest
from isa.config import Config
from isa.split import is_validation
from isa.storage import filesystem, read_column_values, reader_options
from pipelines.console import without_progress_bars
from pipelines.stage import data_context

VIEW_ROWS = 256  # rows per call of the decode-and-view tasks: bounded memory per task, whatever the shard size


def split_and_view(
    batch: dict[str, Any],
    *,
    validation: bool,
    fraction: float,
    size: int,
    scale_min: float,
    hflip: bool,
    preprocess: dict | None = None,
    grid: int = 0,
) -> dict[str, np.ndarray]:
    """CPU task: keep one split's rows, decode and view their JPEGs, embeddings as float32 rows.

    With the teacher's ``preprocess`` and local ``grid`` (training views for LAR), each row also gets ``cells``:
    where the teacher's local cells lie in its view, (n, G*4) float32.
    """
    from isa.augment import eval_view, train_view, views, views_and_cells

    rows = np.flatnonzero([is_validation(str(i), fraction) == validation for i in batch["id"]])
    images = [batch["image"][i] for i in rows]
    if validation or not grid:
        transform = eval_view(size) if validation else train_view(size, scale_min, hflip)
        out = {"view": views(images, transform, size)}  # (n, S, S, 3) uint8
    else:
        view, cells = views_and_cells(images, train_view(size, scale_min, hflip), preprocess, grid)
        out = {"view": view, "cells": cells.reshape(len(rows), -1)}  # (n, S, S, 3) uint8, (n, G*4)
    for column in ("teacher_emb", "teacher_local"):
        if column in batch:
            out[column] = np.array([np.asarray(batch[column][i], np.float32) for i in rows], np.float32)  # (n, K)
    return out


def training_rows(config: Config, parts: list[str]) -> int:
    """Rows of the cache's shards ``parts`` outside the held-out split (read from the id column only)."""
    fs, _ = filesystem(config.train.cache)
    ids = read_column_values(fs, parts, ["id"])["id"].to_pylist()
    return sum(not is_validation(i, config.train.val_fraction) for i in ids)


def pass_order(parts: list[str], passes: int, seed: int) -> list[str]:
    """The shards of ``passes`` passes over the cache, one after another, each pass in its own random order."""
    rng = random.Random(seed)
    return [part for _ in range(passes) for part in rng.sample(parts, len(parts))]


def datasets(
    parts: list[str], config: Config, passes: int, manifest: Manifest | None = None
) -> dict[str, ray.data.Dataset]:
    """The train dataset (``passes`` passes in one stream) and the validation dataset.

    With the cache's ``manifest``, the training views carry where the teacher's local cells lie in them (for
    LAR) and are no larger than the cached images (see below).

    One stream for the whole run, rather than one per pass: each new stream would wait a few seconds for
    Ray Data to list, open and decode its first shards (about 4 s per pass on 2 CPUs). The views are no
    larger than the cached images' short side ``cached_size``; the worker resizes them to the student's
    input, so no upsampled pixels fill the object store (the quickstart's 64 px cache feeds a 96 px student).
    """
    lar = config.loss.lar_weight > 0
    columns = ["id", "image", "teacher_emb"] + (["teacher_local"] if lar else [])
    cached_size = manifest.image_size if manifest is not None else None
    split = {
        "fraction": config.train.val_fraction,
        "size": min(config.student.image_size, cached_size or config.student.image_size),
        "scale_min": config.train.crop_scale_min,
        "hflip": config.train.hflip,
    }
    geometry = {"preprocess": manifest.teacher["preprocess"], "grid": manifest.local_grid} if lar and manifest else {}
    storage = reader_options(config.train.cache)  # object storage with the S3 settings of isa.storage
    # Ray Data's parquet reader V1 for both: V2 reads a path listed twice only once (V1 reads every entry), and
    # starts a pool of footer-reading actors (a process each) for every read, here of a handful of files
    with data_context(use_datasource_v2=False):
        train = ray.data.read_parquet(pass_order(parts, passes, config.train.seed), **storage).select_columns(columns)
        val = ray.data.read_parquet(parts, **storage).select_columns(columns)
    views = {"batch_size": VIEW_ROWS}
    train = train.map_batches(split_and_view, fn_kwargs={"validation": False, **split, **geometry}, **views)
    val = val.map_batches(split_and_view, fn_kwargs={"validation": True, **split}, **views)
    val = val.limit(config.train.val_images)
    # read in Ray Train's processes, whose progress bars the driver would draw again after they finish; the
    # step lines show a run's progress
    return without_progress_bars({"train": train, "val": val})


def ingest_options() -> ray.data.ExecutionOptions:
    """Ray Train's default ingest options (``DataConfig.default_ingest_options``) without the deprecated
    ``exclude_resources``, which that default passes on (and Ray warns about in its dataset manager)."""
    options = ray.data.DataContext.get_current().execution_options
    return ray.data.ExecutionOptions(
        resource_limits=options.resource_limits,
        preserve_order=options.preserve_order,
        verbose_progress=options.verbose_progress,
    )
