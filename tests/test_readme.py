"""The README and docs/cli.md as a user reads them: every ``isa`` command line in their shell blocks names a
stage and only options its parser takes, every config file it names exists, every override is a real key with a
value of the right type; the Python snippet of the query side runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from isa.config import load_config
from pipelines.cli import STAGES, stage_module

REPO = Path(__file__).resolve().parents[1]
GUIDES = ("README.md", "docs/cli.md")


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def isa_commands(text: str) -> list[list[str]]:
    """The argument lists of each ``isa`` command in the shell blocks (also after ``&&`` and ``ray job ... --``)."""
    commands = []
    for block in shell_blocks(text):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if "--" in words and "isa" in words[words.index("--") + 1 : words.index("--") + 2]:
                    words = words[words.index("--") + 1 :]
                if words[:1] == ["isa"]:
                    commands.append(words[1:])
    return commands


def test_every_guide_has_isa_commands_of_every_main_stage():
    stages = {command[0] for guide in GUIDES for command in isa_commands((REPO / guide).read_text())}
    assert {"embed", "train", "eval", "tune", "ablate", "quickstart"} <= stages


@pytest.mark.parametrize(
    "guide, command",
    [(guide, command) for guide in GUIDES for command in isa_commands((REPO / guide).read_text())],
    ids=lambda value: " ".join(value) if isinstance(value, list) else value,
)
def test_isa_command_parses_with_its_stage(guide, command):
    stage, args = command[0], command[1:]
    assert stage in STAGES, f"{guide}: isa {stage}: no such stage ({sorted(STAGES)})"
    parsed = stage_module(stage).parser().parse_intermixed_args(args)  # an unknown option exits with status 2
    config = getattr(parsed, "config", None)
    if config and stage != "quickstart":
        assert (REPO / config).is_file(), f"{guide}: isa {stage}: --config {config} does not exist"
    overrides = getattr(parsed, "overrides", [])
    if stage in ("tune", "ablate"):  # sweep files hold a space: besides the config sections
        load_config(None, overrides)
    else:
        load_config(REPO / config if config and stage != "quickstart" else None, overrides)


def test_an_unknown_option_is_caught():
    with pytest.raises(SystemExit):
        stage_module("embed").parser().parse_intermixed_args(["IN", "OUT", "--teachr", "x"])
    assert isa_commands("```bash\nA=1 && isa world out  # note\nray job submit -- isa train x.y=1\n```\n") == [
        ["world", "out"],
        ["train", "x.y=1"],
    ]


def test_the_query_side_snippet_runs_and_ranks_the_gallery(tmp_path, monkeypatch, capsys):
    import io

    import numpy as np
    import torch
    from PIL import Image

    from isa.build import build_student, build_task, build_teacher
    from isa.cache import Manifest, shard_table
    from isa.checkpoint import save_checkpoint
    from isa.config import to_dict
    from isa.storage import filesystem, write_table

    (snippet,) = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    tiny = ["teacher.name=isa-tiny-ViT", "teacher.pretrained=none", "student.image_size=64", "token_learner.dim=64"]
    config = load_config(None, [*tiny, "token_learner.heads=4"])
    teacher = build_teacher(config.teacher)
    torch.manual_seed(0)
    task = build_task(config, teacher, build_student(config, teacher))
    saved = {"config": to_dict(config), "teacher": teacher.fingerprint()}
    save_checkpoint(tmp_path / "run" / "checkpoint_000003" / "isa", config=saved, weights=task.trainable_state_dict(),
                    state={"step": 3})  # fmt: skip
    gallery = np.random.default_rng(0).normal(size=(40, teacher.embed_dim)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    manifest = Manifest(teacher=teacher.fingerprint(), embed_dim=teacher.embed_dim, local_grid=0, dtype="float32",
                        image_size=None)  # fmt: skip
    uris = [f"s3://gallery/{i}.jpg" for i in range(40)]
    table = shard_table(manifest, [f"{i:064x}" for i in range(40)], uris, np.full((40, 2), 64), gallery)
    fs, root = filesystem(str(tmp_path / "gallery"))
    write_table(fs, f"{root}/part-0.parquet", table)
    image = io.BytesIO()
    Image.new("RGB", (80, 60), (200, 30, 30)).save(image, "JPEG")
    (tmp_path / "dress.jpg").write_bytes(image.getvalue())

    code = snippet.replace('"ViT-L-14", "openai"', '"isa-tiny-ViT", "none"')
    code = code.replace('"RUN_DIR"', repr(str(tmp_path / "run"))).replace('"GALLERY_CACHE"', repr(str(root)))
    assert code != snippet
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.strip()
    query = namespace["query"].numpy()[0]  # (D,)
    expected = [uris[i] for i in np.argsort(-(gallery @ query), kind="stable")[:10]]
    assert printed == repr(expected)
