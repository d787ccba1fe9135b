from __future__ import annotations

import random

import fsspec
import numpy as np
import pytest
import torch

from isa import checkpoint as ckpt
from isa.build import build_student, build_task
from isa.checkpoint_files import complete_checkpoints
from isa.config import load_config, to_dict


def _trained_task(teacher):
    config = load_config(None, ["student.backbone=mobilenetv2_100", "token_learner.dim=64", "token_learner.heads=4"])
    torch.manual_seed(0)
    task = build_task(config, teacher, build_student(config, teacher))
    optimizer = torch.optim.AdamW(task.trainable_parameters(), lr=1e-3)
    images = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        g, local = teacher.encode_image_local(teacher.prepare(images), 2)
    task(images, g, local)["loss"].backward()
    optimizer.step()
    return config, task, optimizer


def test_round_trip_is_bit_exact(tmp_path, clip_teacher):
    config, task, optimizer = _trained_task(clip_teacher)
    meta = {"config": to_dict(config), "teacher": clip_teacher.fingerprint()}
    rng = ckpt.capture_rng_state()
    path = ckpt.save_checkpoint(
        tmp_path / "checkpoint_000001",
        config=meta,
        weights=task.trainable_state_dict(),
        state={"step": 1, "epoch": 0, "rng": rng},
        optimizer={"optimizer": optimizer.state_dict()},
    )
    loaded = ckpt.load_checkpoint(path)
    assert loaded.config == meta and loaded.state["step"] == 1
    original = task.trainable_state_dict()
    assert loaded.weights.keys() == original.keys()
    for name, tensor in original.items():
        assert loaded.weights[name].dtype == tensor.dtype and torch.equal(loaded.weights[name], tensor), name
    saved_state = optimizer.state_dict()["state"]
    for index, values in saved_state.items():
        for key, value in values.items():
            assert torch.equal(loaded.optimizer["optimizer"]["state"][index][key], value)
    # restoring into a fresh task gives identical outputs
    _, fresh, _ = _trained_task(clip_teacher)
    fresh.load_trainable_state_dict(loaded.weights)
    fresh.eval(), task.eval()
    images = torch.rand(2, 3, 64, 64)
    assert torch.equal(fresh.student(images).sentence, task.student(images).sentence)


def test_rng_state_round_trips():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = ckpt.capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_crash_during_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    weights = {"w": torch.arange(6.0).view(2, 3)}
    path = ckpt.save_checkpoint(tmp_path / "latest", config={"a": 1}, weights=weights, state={"step": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(
            path, config={"a": 2}, weights={"w": torch.zeros(2)}, state={"step": 2}, optimizer={"x": 1}
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]  # no staging leftovers
    assert ckpt.load_checkpoint(path).state["step"] == 1
    assert torch.equal(ckpt.load_checkpoint(path).weights["w"], weights["w"])


def test_incomplete_or_missing_checkpoints_are_refused(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "nope")
    path = ckpt.save_checkpoint(tmp_path / "c", config={}, weights={"w": torch.ones(1)}, state={"step": 0})
    (path / ckpt.STATE_FILE).unlink()
    assert not ckpt.is_checkpoint(path)
    with pytest.raises(ckpt.CheckpointError, match="state.json"):
        ckpt.load_checkpoint(path)
    path = ckpt.save_checkpoint(tmp_path / "d", config={}, weights={"w": torch.ones(1)}, state={"step": 0})
    size = (path / ckpt.WEIGHTS_FILE).stat().st_size
    (path / ckpt.WEIGHTS_FILE).write_bytes(b"x" * size)  # the recorded size, not safetensors
    with pytest.raises(ckpt.CheckpointError, match="unreadable"):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize("cut", [ckpt.STATE_FILE, ckpt.WEIGHTS_FILE, ckpt.CONFIG_FILE, ckpt.OPTIMIZER_FILE])
def test_a_copy_cut_short_is_not_a_checkpoint_and_never_the_latest(tmp_path, cut):
    """Ray Train uploads a checkpoint file by file; a worker killed meanwhile leaves some files truncated."""
    weights = {"w": torch.arange(6.0)}
    older = ckpt.save_checkpoint(
        tmp_path / "run" / "checkpoint_a" / "isa", config={}, weights=weights, state={"step": 10}, optimizer={"x": 1}
    )
    newer = ckpt.save_checkpoint(
        tmp_path / "run" / "checkpoint_b" / "isa", config={}, weights=weights, state={"step": 20}, optimizer={"x": 1}
    )
    local = fsspec.filesystem("file")
    assert ckpt.find_checkpoint(tmp_path / "run") == newer
    assert complete_checkpoints(local, str(tmp_path / "run")) == {str(older): 10, str(newer): 20}
    data = (newer / cut).read_bytes()
    (newer / cut).write_bytes(data[: len(data) // 2])
    assert not ckpt.is_checkpoint(newer)
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.load_checkpoint(newer)
    assert ckpt.find_checkpoint(tmp_path / "run") == older
    assert complete_checkpoints(local, str(tmp_path / "run")) == {str(older): 10}  # any fsspec filesystem
    assert ckpt.load_checkpoint(older).state["step"] == 10


def test_optimizer_state_is_read_without_unpickling_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    path = ckpt.save_checkpoint(
        tmp_path / "c", config={}, weights={"w": torch.ones(1)}, state={"step": 0}, optimizer={"evil": Payload()}
    )
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        ckpt.load_checkpoint(path)
