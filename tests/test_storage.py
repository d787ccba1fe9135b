"""Object storage as it fails: retries as configured, wrong credentials refused at the start, checkpoint copies
whole or not at all, secrets of URIs never shown or saved. No Ray: moto behind the fault-injecting proxy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import s3fs
import torch
from _flaky_s3 import FAULTS, start_moto
from _students import TEACHER, save_student

import pipelines.eval as eval_stage
from isa.checkpoint import CheckpointError, is_checkpoint, load_checkpoint
from isa.config import flatten, load_config, saved_dict
from isa.errors import IsaError
from isa.storage import StorageError, arrow_filesystem, filesystem, redact_uri, s3_settings
from pipelines import tracking
from pipelines.cli import STAGES, main, refusal, stage_module

SECRET = "s3cret-Pa55"


def test_redact_uri_hides_the_secret_of_every_uri_in_a_text():
    assert redact_uri("https://isa:s3cret@mlflow.example:5000/x") == "https://isa:***@mlflow.example:5000/x"
    assert redact_uri("postgresql://u:pa@ss@db:5432/m") == "postgresql://u:***@db:5432/m"  # an unescaped @ too
    assert redact_uri("at http://token@host/ and s3://b/k?x=1") == "at http://***@host/ and s3://b/k?x=1"
    for plain in ("sqlite:///a/b.db", "s3://bucket/run", "/local/path", "http://127.0.0.1:5000", "a@b.c"):
        assert redact_uri(plain) == plain


def test_saved_configs_params_messages_and_commands_hide_a_uri_secret():
    uri = f"https://isa:{SECRET}@mlflow.example"
    config = load_config(None, [f"train.tracking_uri={uri}", f"eval.dataset_root=https://me:{SECRET}@data/cirr"])
    assert config.train.tracking_uri == uri  # the stage itself uses the secret
    assert SECRET not in json.dumps(saved_dict(config)) and SECRET not in json.dumps(flatten(config))
    assert saved_dict(config)["train"]["tracking_uri"] == "https://isa:***@mlflow.example"
    assert tracking.ui_command(uri) == "open https://isa:***@mlflow.example (the MLflow server)"
    assert (
        refusal(IsaError(f"MLflow at {uri} did not answer"))
        == "MLflow at https://isa:***@mlflow.example did not answer"
    )
    assert SECRET not in refusal(OSError(f"cannot reach {uri}"))


def test_s3_settings_come_from_the_environment_and_bad_ones_are_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("ISA_S3_ATTEMPTS", raising=False)
    assert s3_settings().attempts == 10
    monkeypatch.setenv("ISA_S3_ATTEMPTS", "3")
    monkeypatch.setenv("ISA_S3_READ_TIMEOUT", "2.5")
    assert (s3_settings().attempts, s3_settings().read_timeout) == (3, 2.5)
    monkeypatch.setenv("ISA_S3_ATTEMPTS", "many")
    with pytest.raises(StorageError, match="ISA_S3_ATTEMPTS='many' is not a positive whole number"):
        s3_settings()
    assert main(["embed", "s3://bucket/images", str(tmp_path / "out"), *TEACHER]) == 2
    err = capsys.readouterr().err
    assert err == (
        "isa embed: error: ISA_S3_ATTEMPTS='many' is not a positive whole number: set it so, or unset it for the "
        "default\n"
    )
    assert not (tmp_path / "out").exists()


def test_a_request_is_tried_as_many_times_as_configured(flaky_s3, monkeypatch):
    fs, _ = filesystem("s3://isa-retries")
    fs.mkdir("isa-retries")
    fs.pipe_file("isa-retries/object", b"payload")
    monkeypatch.setenv("ISA_S3_ATTEMPTS", "2")
    monkeypatch.setenv("ISA_S3_CONNECT_TIMEOUT", "5")
    fs, path = filesystem("s3://isa-retries/object")
    retries = fs.config_kwargs["retries"]
    assert retries == {"mode": "standard", "total_max_attempts": 2} and fs.config_kwargs["connect_timeout"] == 5
    with flaky_s3.faults(1.0, kinds=("slowdown",)) as proxy:  # every request answered 503 SlowDown
        with pytest.raises(OSError):
            fs.cat_file(path, start=0, end=7)
    # botocore tries the request twice; s3fs the call twice (an answer cut short or SlowDown): 2 x 2
    assert proxy.injected == {"slowdown": 4}
    store, key = arrow_filesystem("s3://isa-retries/object")
    with flaky_s3.faults(1.0, kinds=("slowdown",)) as proxy:
        with pytest.raises(OSError):
            store.open_input_stream(key).read()
    assert proxy.injected == {"slowdown": 2}  # the same client behind pyarrow: its first request (HEAD) tried twice
    monkeypatch.delenv("ISA_S3_ATTEMPTS")  # the default tries
    fs, _ = filesystem("s3://isa-retries")
    store, _ = arrow_filesystem("s3://isa-retries")
    for kind in FAULTS:  # a third of the requests fail, in each way in turn: every call goes through
        with flaky_s3.faults(0.3, seed=1, kinds=(kind,)) as proxy:
            for i in range(4):
                fs.pipe_file(f"isa-retries/{kind}/{i}", str(i).encode())
            assert [fs.cat_file(f"isa-retries/{kind}/{i}") for i in range(4)] == [str(i).encode() for i in range(4)]
            assert store.open_input_stream("isa-retries/object").read() == b"payload"
        assert proxy.injected[kind] > 0


@pytest.fixture(scope="module")
def authenticating_s3():
    """A moto server that checks credentials (no IAM user exists: every access key is refused)."""
    process, endpoint = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    yield endpoint
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def no_ray(monkeypatch):
    def tripwire(*args, **kwargs):
        raise AssertionError("Ray was started before the refusal")

    started = ray.is_initialized()
    monkeypatch.setattr(ray, "init", tripwire)
    for name in ("embed", "train", "eval"):
        monkeypatch.setattr(stage_module(name), "init_ray", tripwire)
    yield
    assert ray.is_initialized() == started


@pytest.mark.parametrize(
    "stage",
    [
        ["embed", "s3://isa-locked/images", "{out}", *TEACHER],
        ["train", "train.cache=s3://isa-locked/cache", "train.output={out}", *TEACHER],
        ["eval", "--benchmark", "images", "--dataset-root", "s3://isa-locked/cache", "--output", "{out}", *TEACHER],
    ],
    ids=lambda args: args[0],
)
def test_wrong_credentials_are_one_line_at_the_start(
    stage, authenticating_s3, s3_endpoint, monkeypatch, tmp_path, capsys, no_ray
):
    assert stage[0] in STAGES
    monkeypatch.setenv("AWS_ENDPOINT_URL", authenticating_s3)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    s3fs.S3FileSystem.clear_instance_cache()  # instances keep the endpoint they were made with
    try:
        out = tmp_path / "out"
        assert main([a.replace("{out}", str(out)) for a in stage]) == 2
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"isa {stage[0]}: error: s3://isa-locked refused the credentials of this environment (InvalidAccessKeyId: "
        "The AWS Access Key Id you provided does not exist in our records.): check AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN, AWS_PROFILE), and AWS_ENDPOINT_URL\n"
    )
    assert SECRET not in captured.err and not out.exists()


def _upload_run(fs: s3fs.S3FileSystem, local: Path, bucket: str) -> str:
    fs.mkdir(bucket)
    fs.put(str(local) + "/", f"{bucket}/run/checkpoint_000000/isa/", recursive=True)
    return f"s3://{bucket}/run"


def test_a_checkpoint_copy_cut_short_is_made_again_never_reused(s3_endpoint, tmp_path, monkeypatch):
    local = save_student(tmp_path / "student")
    fs, _ = filesystem("s3://isa-copies")
    run = _upload_run(fs, local, "isa-copies")
    out = tmp_path / "eval"
    first = Path(eval_stage.local_copy(run, str(out)))
    assert is_checkpoint(first) and first.parent == out / eval_stage.CHECKPOINT_COPIES
    # a copy cut short in place (as a killed copy of another version left it): half its weights
    weights = first / "student.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert not is_checkpoint(first)
    again = Path(eval_stage.local_copy(run, str(out)))
    assert again == first and is_checkpoint(again)
    original, copied = load_checkpoint(local).weights, load_checkpoint(again).weights
    assert original.keys() == copied.keys() and all(torch.equal(original[k], copied[k]) for k in original)
    assert sorted(p.name for p in again.parent.iterdir()) == [again.name]  # no staging left

    # the checkpoint goes while it is copied (a training run's num_to_keep removes it): nothing that looks like a copy
    gone = _upload_run(fs, local, "isa-copies-gone")
    listed = eval_stage.latest_checkpoint

    def listed_then_removed(store, path):
        found = listed(store, path)
        fs.rm(f"{found}/student.safetensors")
        return found

    monkeypatch.setattr(eval_stage, "latest_checkpoint", listed_then_removed)
    with pytest.raises(CheckpointError, match=r"the copy of s3://isa-copies-gone/run/checkpoint_000000/isa is incomp"):
        eval_stage.local_copy(gone, str(tmp_path / "eval-gone"))
    assert list((tmp_path / "eval-gone" / eval_stage.CHECKPOINT_COPIES).iterdir()) == []
