"""The held-out split of a teacher cache, decided by each image's id: stable across runs, workers and resumes.

``isa train`` validates on it and ``isa eval --benchmark images`` measures image-only retrieval on it, so the
student never trained on the images it is measured on.
"""

from __future__ import annotations

import hashlib


def is_validation(image_id: str, fraction: float) -> bool:
    """Whether the image with this id (the sha256 of its bytes) is held out, for a held-out ``fraction``."""
    return int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16) / 2**32 < fraction
