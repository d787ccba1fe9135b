"""The ``isa`` command: dispatch, config validation before any work, the world stage."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import yaml

from isa.config import Config, from_dict
from isa.data.synthetic import generate_world, write_world
from pipelines.cli import main


def _isa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_stages():
    result = _isa("--help")
    assert result.returncode == 0 and "world" in result.stdout and "config" in result.stdout
    assert _isa("config", "--help").returncode == 0 and _isa("world", "--help").returncode == 0


def test_unknown_stage_is_named():
    result = _isa("embedd")
    assert result.returncode == 2 and "'embedd'" in result.stderr and "world" in result.stderr


def test_config_prints_the_resolved_config(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  lar_weight: 1.0\n")
    assert main(["config", "--config", str(path), "token_learner.num_tokens=8"]) == 0
    printed = from_dict(yaml.safe_load(capsys.readouterr().out))
    assert printed.loss.lar_weight == 1.0 and printed.token_learner.num_tokens == 8
    assert printed.train == Config().train


def test_config_errors_exit_2_naming_the_key():
    result = _isa("config", "train.bogus=1")
    assert result.returncode == 2 and "'train.bogus'" in result.stderr and "'lr'" in result.stderr


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_world_stage_writes_the_library_world(tmp_path):
    assert main(["world", str(tmp_path / "cli"), "--seed", "3", "--num-images", "40", "--num-triplets", "12"]) == 0
    write_world(generate_world(3, 40, 12, 64), tmp_path / "lib")
    cli, lib = _digest(tmp_path / "cli"), _digest(tmp_path / "lib")
    assert cli == lib and "cirr/cirr/captions/cap.rc2.val.json" in cli


def test_a_stage_error_is_one_line_and_exit_2_and_leaves_no_output(ray_session, tmp_path, capsys):
    out = tmp_path / "cache"
    code = main(
        ["embed", str(tmp_path / "no-such-folder"), str(out), "--teacher", "isa-tiny-ViT", "--pretrained", "none"]
    )
    error = capsys.readouterr().err
    assert code == 2 and error == f"isa embed: error: input not found: {tmp_path / 'no-such-folder'}\n"
    assert not out.exists()  # refused before anything was written


def test_local_paths_reach_ray_absolute_from_where_the_stage_was_run(s3_endpoint, tmp_path, monkeypatch):
    """A cluster's workers run in another folder (``ray start`` elsewhere, RAY_ADDRESS joined): a relative path
    handed to them would name another place, so the stages make local paths absolute and keep URIs as given."""
    from pipelines.embed import parse_args as embed_args
    from pipelines.eval import parse_args as eval_args
    from pipelines.index import parse_args as index_args

    monkeypatch.chdir(tmp_path)
    source, output, _ = embed_args(["images", "cache"])
    assert (source, output) == (str(tmp_path / "images"), str(tmp_path / "cache"))
    source, output, _ = embed_args(["s3://bucket/images", "s3://bucket/cache"])
    assert (source, output) == ("s3://bucket/images", "s3://bucket/cache")
    teacher = ["--teacher", "ViT-B-32", "--pretrained", "openai"]
    config = eval_args(["--dataset-root", "w/cirr", "--checkpoint", "runs/a", "--output", "ev", *teacher])
    assert config.eval.dataset_root == str(tmp_path / "w" / "cirr")
    assert config.eval.checkpoints == (str(tmp_path / "runs" / "a"),)
    assert config.eval.output == str(tmp_path / "ev") and config.eval.gallery_cache is None
    config = eval_args(["--dataset-root", "s3://b/cirr", "--gallery-cache", "gal", *teacher])
    assert config.eval.dataset_root == "s3://b/cirr" and config.eval.gallery_cache == str(tmp_path / "gal")
    cache, out, _ = index_args(["cache", "s3://bucket/index"])
    assert (cache, out) == (str(tmp_path / "cache"), "s3://bucket/index")
