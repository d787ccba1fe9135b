"""Helpers of the sweep and ablation tests (the cache fixture is in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

TINY = {
    "teacher": {"name": "isa-tiny-ViT", "pretrained": "none"},
    "student": {"backbone": "mobilenetv3_large_100", "image_size": 64},
    "token_learner": {"dim": 64, "heads": 4},
}


def tiny_config(cache: str, storage: Path, tracking_uri: str | None, **sections: dict) -> dict:
    """A config mapping for short CPU trials: batch 16, a held-out fifth, the given sections merged on top
    (``tracking_uri`` None: the sweep folder's own store)."""
    config = {
        **TINY,
        "train": {
            "cache": cache,
            "global_batch_size": 16,
            "val_fraction": 0.2,
            "warmup_fraction": 0.0,
            "tracking_uri": tracking_uri,
            "experiment": "isa-tune-tests",
        },
        "tune": {"storage": str(storage)},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
