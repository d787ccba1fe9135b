"""A rerun into a training run folder, a resume with other settings, and the teacher taken from saved work, from
the command line as a user runs them. Every refusal here comes before Ray starts and leaves the run folder as it
was; the end-to-end resume of a real run is in ``test_train.py``, an evaluation without a teacher setting in
``test_eval.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _students import TINY, save_student
from safetensors.torch import save_file

from isa.cache import Manifest, write_manifest
from isa.config import TeacherConfig, load_config, to_dict
from isa.data.synthetic import generate_world, write_world
from isa.storage import filesystem
from isa.teacher import load_teacher
from pipelines import eval as eval_stage
from pipelines import train
from pipelines.cli import main as isa
from pipelines.ray_compat import RUN_SNAPSHOT_FILE
from pipelines.train.runs import RESUMABLE, RunFolderError, check_run_folder

OTHER_TEACHER = ["teacher.name=isa-tiny-ViT-custom-text", "teacher.pretrained=none"]
NO_TEACHER = [o for o in TINY if not o.startswith("teacher.")]


def _run_folder(root: Path, total: int = 40, step: int | None = 40) -> tuple[Path, list[str]]:
    """A run folder as ``isa train`` leaves it, without training: its ``isa_config.json`` and, unless ``step`` is
    None, a checkpoint at ``step`` (random weights). Returns the folder and the settings the run was made with."""
    run = root / "runs" / "a"
    settings = [*TINY, f"train.max_steps={total}", "train.lr=0.0003", f"train.output={run}"]
    if step is not None:
        save_student(run / "checkpoint_000000" / "isa", *settings, step=step)
    run.mkdir(parents=True, exist_ok=True)
    (run / train.RUN_CONFIG_FILE).write_text(json.dumps(to_dict(load_config(None, settings)), indent=2))
    return run, settings


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _teacher_cache(folder: Path, name: str = "isa-tiny-ViT") -> Path:
    """A cache manifest of the random-init teacher ``name`` (no shards: enough for what is read before Ray)."""
    fingerprint = load_teacher(name, "none").fingerprint()
    manifest = Manifest(fingerprint, fingerprint["embed_dim"], local_grid=0, dtype="float32", image_size=64)
    folder.mkdir(parents=True)
    write_manifest(*filesystem(str(folder)), manifest)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reruns-world")
    write_world(generate_world(seed=3, num_images=60, num_triplets=40, image_size=48), root)
    return root


# ---- isa train: a rerun and a resume ------------------------------------------------------------------------


def test_a_new_run_into_a_folder_that_holds_a_run_is_refused_before_ray_starts(tmp_path):
    run, settings = _run_folder(tmp_path)
    before = _contents(run)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    command = [str(Path(sys.executable).with_name("isa")), "train", *settings, f"train.cache={tmp_path / 'cache'}"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"isa train: error: {run} already holds a training run (last checkpoint at step 40 of 40); continue it "
        f"with 'isa train --resume {run}', or choose another train.output"
    )
    assert "Ray" not in result.stderr and result.stdout == ""  # refused before Ray started
    assert _contents(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


@pytest.mark.parametrize("holds", ["config only", "Ray Train snapshot only"])
def test_a_run_without_a_checkpoint_still_holds_the_folder(tmp_path, capsys, holds):
    run, settings = _run_folder(tmp_path, step=None)
    if holds != "config only":
        (run / train.RUN_CONFIG_FILE).unlink()
        (run / RUN_SNAPSHOT_FILE).write_text("{}")
    before = _contents(run)
    assert isa(["train", *settings]) == 2
    assert f"{run} already holds a training run (no checkpoint yet)" in capsys.readouterr().err
    assert _contents(run) == before


def test_a_resume_may_change_the_steps_resources_and_checkpointing_only(tmp_path, capsys):
    run, _ = _run_folder(tmp_path)
    before = _contents(run)
    changed = [
        "train.max_steps=80",
        "train.num_workers=2",
        "train.worker_cpus=0.5",
        "train.checkpoint_every=5",
        "eval.batch_size=3",
    ]
    config = train.parse_args(["--resume", str(run), *changed])
    assert config.train.max_steps == 80 and config.train.num_workers == 2 and config.train.lr == 0.0003
    assert check_run_folder(config, "resume").step == 40  # accepted
    # anything that changes what is learnt is refused, each key named with both values; the allowed ones are not
    assert isa(["train", "--resume", str(run), "train.lr=0.01", *OTHER_TEACHER, "train.max_steps=80"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"isa train: error: a resume continues the run in {run} with its own settings")
    assert "train.lr: 0.0003 in the run, 0.01 now" in error
    assert "teacher.name: 'isa-tiny-ViT' in the run, 'isa-tiny-ViT-custom-text' now" in error
    assert "train.max_steps: " not in error and "teacher.pretrained: " not in error  # allowed, or unchanged
    assert "A resume may change only " + ", ".join(sorted(RESUMABLE)) in error and len(error.splitlines()) == 1
    assert _contents(run) == before


@pytest.mark.parametrize("steps", [[], ["train.max_steps=30"]])
def test_a_resume_of_a_finished_run_is_refused_with_the_way_on(tmp_path, capsys, steps):
    run, _ = _run_folder(tmp_path)
    before = _contents(run)
    assert isa(["train", "--resume", str(run), *steps]) == 2
    total = 30 if steps else 40
    assert capsys.readouterr().err.strip() == (
        f"isa train: error: the run in {run} has nothing left to do: its last checkpoint is at step 40, and these "
        f"settings end it at step {total}; raise train.max_steps (or train.epochs) above 40 to train it further"
    )
    assert _contents(run) == before


def test_a_resume_of_a_folder_without_a_run_or_with_a_config_file_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (empty, tmp_path / "missing"):
        assert isa(["train", "--resume", str(folder)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"isa train: error: {folder} holds no training run to resume (no isa_config.json, run snapshot or "
            f"checkpoint): start one with 'isa train train.output={folder}'"
        )
    run, _ = _run_folder(tmp_path)
    (tmp_path / "mine.yaml").write_text("train:\n  max_steps: 80\n")
    assert isa(["train", "--resume", str(run), "--config", str(tmp_path / "mine.yaml")]) == 2
    assert "give overrides only, without --config" in capsys.readouterr().err
    assert sorted(p.name for p in empty.iterdir()) == [] and not (tmp_path / "missing").exists()


def test_tune_trials_and_the_quickstart_continue_a_run_with_the_same_settings_only(tmp_path):
    run, settings = _run_folder(tmp_path)
    same = load_config(None, settings)
    assert check_run_folder(same, "continue").step == 40  # a restored trial goes on (a finished one: nothing to do)
    assert check_run_folder(load_config(None, [*settings, "train.max_steps=80"]), "continue").step == 40
    with pytest.raises(RunFolderError, match=r"with other settings \(train\.lr: 0\.0003 in the run, 0\.001 now\)"):
        check_run_folder(load_config(None, [*settings, "train.lr=0.001"]), "continue")
    fresh = load_config(None, [*settings, f"train.output={tmp_path / 'runs' / 'b'}"])
    assert check_run_folder(fresh, "continue") is None and check_run_folder(fresh, "new") is None


# ---- the teacher from the cache or the checkpoints ----------------------------------------------------------


def test_train_takes_the_teacher_of_its_cache_and_refuses_another_by_name(tmp_path, capsys):
    cache = _teacher_cache(tmp_path / "cache")
    settings = [*NO_TEACHER, f"train.cache={cache}", f"train.output={tmp_path / 'run'}"]
    assert train.parse_args(settings).teacher == TeacherConfig("isa-tiny-ViT", "none")
    assert train.parse_args([*settings, "teacher.cache_dir=/weights"]).teacher == TeacherConfig(
        "isa-tiny-ViT", "none", "/weights"
    )
    assert train.parse_args(NO_TEACHER).teacher == TeacherConfig()  # no cache to take it from: the default
    assert isa(["train", *settings, *OTHER_TEACHER]) == 2
    assert capsys.readouterr().err.strip() == (
        "isa train: error: the teacher given, isa-tiny-ViT-custom-text (pretrained none), is another model than "
        f"the one of teacher cache {cache}, isa-tiny-ViT (pretrained none): leave out the teacher setting "
        "(teacher.name, teacher.pretrained) to use that one"
    )
    assert not (tmp_path / "run").exists()


def test_embed_resumes_a_cache_with_its_teacher_and_refuses_another_by_name(world, tmp_path, capsys):
    from pipelines import embed

    cache = _teacher_cache(tmp_path / "cache")
    images = str(world / "images")
    assert embed.parse_args([images, str(cache)])[2].teacher == TeacherConfig("isa-tiny-ViT", "none")
    assert embed.parse_args([images, str(tmp_path / "new")])[2].teacher == TeacherConfig()  # nothing to resume
    before = _contents(cache)
    assert isa(["embed", images, str(cache), *OTHER_TEACHER]) == 2
    assert capsys.readouterr().err.strip() == (
        "isa embed: error: the teacher given, isa-tiny-ViT-custom-text (pretrained none), is another model than "
        f"the one of teacher cache {cache}, isa-tiny-ViT (pretrained none): leave out the teacher setting "
        "(teacher.name, teacher.pretrained) to use that one"
    )
    assert _contents(cache) == before


def test_eval_takes_the_teacher_of_its_checkpoints_or_its_gallery_cache(world, tmp_path):
    checkpoint = save_student(tmp_path / "run" / "checkpoint_000000" / "isa")
    cirr = ["--benchmark", "cirr", "--dataset-root", str(world / "cirr"), f"eval.output={tmp_path / 'out'}"]
    assert eval_stage.parse_args([*cirr, "--checkpoint", str(tmp_path / "run")]).teacher.name == "isa-tiny-ViT"
    gallery = _teacher_cache(tmp_path / "gallery", "isa-tiny-ViT-custom-text")
    config = eval_stage.parse_args([*cirr, "--gallery-cache", str(gallery)])
    assert config.teacher == TeacherConfig("isa-tiny-ViT-custom-text", "none")
    weights = tmp_path / "teacher.safetensors"  # a key given is the user's, the other one the checkpoint's
    given = eval_stage.parse_args([*cirr, "--checkpoint", str(checkpoint), "--pretrained", str(weights)])
    assert given.teacher == TeacherConfig("isa-tiny-ViT", str(weights))


def test_eval_refuses_a_checkpoint_of_another_teacher_before_the_gallery_is_embedded(world, tmp_path, capsys):
    other = save_student(tmp_path / "other" / "isa", *OTHER_TEACHER)
    mine = save_student(tmp_path / "mine" / "isa")
    output = tmp_path / "out"
    cirr = ["--benchmark", "cirr", "--dataset-root", str(world / "cirr"), f"eval.output={output}"]
    # a teacher given that is not the checkpoint's
    assert isa(["eval", *cirr, "--checkpoint", str(other), "--teacher", "isa-tiny-ViT", "--pretrained", "none"]) == 2
    assert capsys.readouterr().err.strip() == (
        "isa eval: error: the teacher given, isa-tiny-ViT (pretrained none), is another model than the one of "
        f"checkpoint {other}, isa-tiny-ViT-custom-text (pretrained none): leave out the teacher setting "
        "(teacher.name, teacher.pretrained) to use that one"
    )
    # no teacher given: checkpoints of two teachers, or a checkpoint and a gallery cache of two teachers
    assert isa(["eval", *cirr, "--checkpoint", str(mine), "--checkpoint", str(other)]) == 2
    error = capsys.readouterr().err
    assert f"checkpoint {mine} and checkpoint {other} come from different teachers" in error
    assert "isa-tiny-ViT (pretrained none) and isa-tiny-ViT-custom-text (pretrained none)" in error
    gallery = _teacher_cache(tmp_path / "gallery")
    before = _contents(gallery)
    assert isa(["eval", *cirr, "--checkpoint", str(other), "--gallery-cache", str(gallery)]) == 2
    assert f"checkpoint {other} and gallery cache {gallery} come from different teachers" in capsys.readouterr().err
    assert _contents(gallery) == before and not output.exists()  # nothing embedded, no output


def test_eval_refuses_other_weights_under_the_same_name_before_the_gallery_is_embedded(
    ray_session, world, tmp_path, capsys
):
    checkpoint = save_student(tmp_path / "run" / "checkpoint_000000" / "isa")  # trained against random init, seed 0
    weights = tmp_path / "teacher.safetensors"
    model = load_teacher("isa-tiny-ViT", "none", seed=1).model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    output = tmp_path / "out"
    flags = ["--benchmark", "cirr", "--dataset-root", str(world / "cirr"), "--checkpoint", str(checkpoint)]
    assert isa(["eval", *flags, "--pretrained", str(weights), f"eval.output={output}"]) == 2  # the checkpoint's name
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"isa eval: error: the teacher isa-tiny-ViT (pretrained {weights}) is not the one of ")
    assert f"checkpoint {checkpoint}" in error and "weights_sha256" in error
    assert not (output / "gallery-cirr-val").exists()
