"""The teacher operator of ``isa embed``: the image tower in an actor, loaded once per actor."""

from __future__ import annotations

import numpy as np
import torch

from isa.teacher import load_teacher, normalize_crops


class TeacherEmbedder:
    """Actor: the teacher image tower, loaded once; crops in, L2-normalized embeddings out.

    Args:
        manifest: the cache manifest (teacher fingerprint, grid); the loaded weights must match it.
        cache_dir: open_clip download folder.
        device: "cuda" (bf16 autocast) or "cpu" (fp32).
        threads: torch threads on CPU.
    """

    def __init__(self, manifest: dict, cache_dir: str | None, device: str, threads: int):
        torch.set_num_threads(threads)
        fingerprint = manifest["teacher"]
        self.teacher = load_teacher(fingerprint["model"], fingerprint["pretrained"], cache_dir=cache_dir, device=device)
        if self.teacher.weights_sha256() != fingerprint["weights_sha256"]:
            raise RuntimeError(f"teacher weights on this worker differ from the driver's ({fingerprint['model']})")
        self.preprocess = fingerprint["preprocess"]
        self.grid = manifest["local_grid"]
        self.device = torch.device(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        crops = torch.from_numpy(batch.pop("crop")).to(self.device)
        pixels = normalize_crops(crops, self.preprocess)  # (B, 3, S, S)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with torch.inference_mode(), autocast:
            if self.grid:
                emb, local = self.teacher.encode_image_local(pixels, self.grid)  # (B, D), (B, G, D)
                batch["teacher_local"] = local.float().cpu().numpy()
            else:
                emb = self.teacher.encode_image(pixels)
        batch["teacher_emb"] = torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy()
        return batch
