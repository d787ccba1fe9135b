"""The sweep and ablation tests share one small synthetic teacher cache."""

from __future__ import annotations

import pytest

from isa.config import load_config
from isa.data.synthetic import generate_world, write_world
from pipelines import embed


@pytest.fixture(scope="session")
def tune_cache(ray_session, tmp_path_factory) -> str:
    """120 synthetic 64-px images through ``isa embed`` (tiny teacher, 2x2 LAR grid), once for tests/tune."""
    root = tmp_path_factory.mktemp("tune-world")
    write_world(generate_world(seed=0, num_images=120, num_triplets=10, image_size=64), root)
    overrides = ["teacher.name=isa-tiny-ViT", "teacher.pretrained=none", "cache.local_grid=2", "cache.image_size=64"]
    embed.run(str(root / "images"), str(root / "cache"), load_config(None, [*overrides, "cache.decode_batch_size=32"]))
    return str(root / "cache")
