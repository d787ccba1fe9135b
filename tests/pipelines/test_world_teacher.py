"""``isa world OUT --teacher``: the world's teacher trained as the quickstart trains it, for pipelines run by hand."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from isa.data.synthetic import WORLD_TEACHER
from isa.teacher import load_teacher
from pipelines import embed
from pipelines import eval as eval_stage

BIN = Path(sys.executable).parent


def _caption_recall_at_10(weights: str, world: Path, count: int = 100) -> float:
    """Caption -> image retrieval over the world's first ``count`` images with the teacher's own towers."""
    rows = [json.loads(line) for line in (world / "captions.jsonl").read_text().splitlines()][:count]
    teacher = load_teacher(WORLD_TEACHER, weights, seed=0).eval()
    with torch.no_grad():
        images = teacher.encode_image(
            teacher.preprocess_images([Image.open(world / r["image"]).convert("RGB") for r in rows])
        )
        texts = teacher.encode_text(teacher.tokenizer([r["caption"] for r in rows]))
    scores = F.normalize(texts.float(), dim=-1) @ F.normalize(images.float(), dim=-1).T
    top = scores.topk(10, dim=1).indices
    return (top == torch.arange(len(rows))[:, None]).any(dim=1).float().mean().item()


def test_world_teacher_is_trained_printed_and_retrieves_above_chance(tmp_path):
    world = tmp_path / "world"
    command = [str(BIN / "isa"), "world", str(world), "--num-images", "120", "--num-triplets", "40"]
    done = subprocess.run([*command, "--teacher", "--teacher-steps", "30"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    weights = world / "teacher" / f"{WORLD_TEACHER}.safetensors"
    assert weights.is_file() and f"world teacher: {weights}" in done.stdout
    assert {p.name for p in world.iterdir()} == {
        "images", "captions.jsonl", "world.json", "cirr", "fashioniq", "circo", "teacher"
    }  # fmt: skip
    assert [p.name for p in (world / "teacher").iterdir()] == [weights.name]

    # the commands it prints are valid for the stages and name that teacher
    printed = [shlex.split(line) for line in done.stdout.splitlines() if line.strip().startswith("isa e")]
    assert [words[1] for words in printed] == ["embed", "eval"]
    _, _, config = embed.parse_args([w.replace("CACHE", str(tmp_path / "cache")) for w in printed[0][2:]])
    assert (config.teacher.name, config.teacher.pretrained) == (WORLD_TEACHER, str(weights))
    config = eval_stage.parse_args(printed[1][2:])
    assert (config.teacher.name, config.teacher.pretrained) == (WORLD_TEACHER, str(weights))
    assert config.eval.dataset_root == str(world / "cirr")

    # that teacher is aligned on the world: well above chance (0.1), where a random-init one is not
    trained, random = _caption_recall_at_10(str(weights), world), _caption_recall_at_10("none", world)
    assert trained > 0.25 and trained > 2 * random, (trained, random)

    # a rerun keeps the world's folder rule: --overwrite replaces the world and its teacher
    again = subprocess.run([*command, "--overwrite"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not (world / "teacher").exists()
