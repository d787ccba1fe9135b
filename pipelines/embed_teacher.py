"""The teacher inside Ray processes: ``isa embed``'s image-tower actor and the teacher's fingerprint.

Drivers reference these by module and name, so this module imports nothing heavy: the drivers of
``isa embed`` and ``isa train`` never load torch or open_clip (about 0.5 GB each). The model is loaded only
in the actor and in a one-off task whose process exits when it is done.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np
import ray

from isa.config import TeacherConfig


class TeacherEmbedder:
    """Actor: the teacher image tower, loaded once; crops in, L2-normalized embeddings out.

    Args:
        manifest: the cache manifest (teacher fingerprint, grid); the loaded weights must match it.
        cache_dir: open_clip download folder.
        device: "cuda" or "cpu"; with the manifest's ``tower_dtype`` float32 the tower runs under bf16 autocast
            on "cuda" and in fp32 on "cpu", with bfloat16 its weights and inputs are cast to bf16.
        threads: torch threads on CPU.
    """

    def __init__(self, manifest: dict, cache_dir: str | None, device: str, threads: int):
        import torch

        from isa.teacher import load_teacher

        torch.set_num_threads(threads)
        fingerprint = manifest["teacher"]
        self.teacher = load_teacher(fingerprint["model"], fingerprint["pretrained"], cache_dir=cache_dir, device=device)
        if self.teacher.weights_sha256() != fingerprint["weights_sha256"]:
            raise RuntimeError(f"teacher weights on this worker differ from the driver's ({fingerprint['model']})")
        self.dtype = getattr(torch, manifest["tower_dtype"])
        self.teacher.model.to(self.dtype)  # after the check: the hash is of the weights as loaded
        self.preprocess = fingerprint["preprocess"]
        self.grid = manifest["local_grid"]
        self.device = torch.device(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from isa.teacher import normalize_crops

        crops = torch.from_numpy(batch.pop("crop")).to(self.device)
        pixels = normalize_crops(crops, self.preprocess).to(self.dtype)  # (B, 3, S, S)
        autocast = torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda" and self.dtype == torch.float32
        )
        with torch.inference_mode(), autocast:
            if self.grid:
                emb, local = self.teacher.encode_image_local(pixels, self.grid)  # (B, D), (B, G, D)
                batch["teacher_local"] = local.float().cpu().numpy()
            else:
                emb = self.teacher.encode_image(pixels)
        batch["teacher_emb"] = torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy()
        return batch


def _fingerprint(config: TeacherConfig) -> dict[str, Any]:
    from isa.build import build_teacher

    return build_teacher(config).fingerprint()


def teacher_fingerprint(config: TeacherConfig) -> dict[str, Any]:
    """The configured teacher's fingerprint (model, weights hash, preprocessing, dims), made in a Ray task.

    The task's worker process exits afterwards (``max_calls=1``), taking the model's memory with it. It
    reserves no CPU, so it never waits behind a running trainer (``isa tune`` starts runs beside others). A
    teacher that cannot be loaded raises the loader's own error here. A process asks once per teacher (a
    weights file counts as the same while its size and modification time are); the quickstart and ``isa tune``
    ask for every stage and run.
    """
    key = _fingerprint_key(config)
    if key not in _FINGERPRINTS:  # None (never reused) is never stored
        task = ray.remote(num_cpus=0, max_calls=1)(_fingerprint)
        try:
            fingerprint = ray.get(task.remote(config))
        except ray.exceptions.RayTaskError as error:
            raise error.cause from None
        if key is None:
            return fingerprint
        _FINGERPRINTS[key] = fingerprint
    return copy.deepcopy(_FINGERPRINTS[key])  # each caller its own copy


_FINGERPRINTS: dict[tuple, dict[str, Any]] = {}


def _fingerprint_key(config: TeacherConfig) -> tuple | None:
    """The teacher config and its weights file's (size, mtime); None where a fingerprint may not be reused."""
    if config.name.startswith("local-dir:"):  # a folder whose files may change under the same name
        return None
    if os.path.isfile(config.pretrained):
        stat = os.stat(config.pretrained)
        return config, stat.st_size, stat.st_mtime_ns
    if "://" in config.pretrained or os.sep in config.pretrained:  # a remote or missing file: read it every time
        return None
    return config, None, None  # an open_clip tag or "none"
