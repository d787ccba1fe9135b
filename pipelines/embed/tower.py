"""``isa embed``'s teacher image tower: an actor of Ray Data's pool, crops in, L2-normalized embeddings out.

Ray Data's coordinators refer to the class by module and name, so the module imports nothing heavy; torch and
open_clip are imported in the actor only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from isa.teacher import Teacher


class TeacherEmbedder:
    """Actor: the teacher image tower, loaded once; crops in, L2-normalized embeddings out.

    Args:
        manifest: the cache manifest (teacher fingerprint, grid); the loaded weights must match it.
        cache_dir: open_clip download folder.
        device: "cuda" or "cpu"; with the manifest's ``tower_dtype`` float32 the tower runs under bf16 autocast
            on "cuda" and in fp32 on "cpu", with bfloat16 its weights and inputs are cast to bf16.
        threads: torch threads on CPU.
        teacher: the teacher, already loaded (a tower in the driver, which made the fingerprint with it); else it
            is loaded here.
    """

    def __init__(
        self, manifest: dict, cache_dir: str | None, device: str, threads: int, teacher: Teacher | None = None
    ):
        import torch

        from isa.teacher import load_teacher

        torch.set_num_threads(threads)
        fingerprint = manifest["teacher"]
        if teacher is None:
            teacher = load_teacher(fingerprint["model"], fingerprint["pretrained"], cache_dir=cache_dir, device=device)
        self.teacher = teacher
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

        crops = batch.pop("crop")  # (B, S, S, 3) uint8
        if not crops.flags.writeable:  # a batch of one block is a read-only view of it: torch needs its own copy
            crops = crops.copy()
        crops = torch.from_numpy(crops).to(self.device)
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
