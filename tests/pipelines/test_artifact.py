"""Deployment artifacts: valid only once the manifest, written last, matches every file (local disk and S3)."""

from __future__ import annotations

import json

import pytest
import s3fs

from pipelines.artifact import (
    ArtifactError,
    check_folder,
    read_artifact,
    read_file,
    seal_artifact,
    write_artifact,
)
from pipelines.lease import LEASE_FILE

FILES = {"model.bin": b"\x00" * 1000, "rows.parquet": b"abc"}


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "artifact")
    request.getfixturevalue("s3_endpoint")
    s3fs.S3FileSystem(skip_instance_cache=True).makedirs("artifacts-test", exist_ok=True)
    return f"s3://artifacts-test/{tmp_path.name}"


def test_written_artifact_reads_back_with_each_file_recorded(folder):
    write_artifact(folder, "_m.json", FILES, {"kind": "test"})
    manifest = read_artifact(folder, "_m.json", "test artifact")
    assert manifest["kind"] == "test"
    assert {name: entry["bytes"] for name, entry in manifest["files"].items()} == {"model.bin": 1000, "rows.parquet": 3}
    assert read_file(folder, "model.bin", manifest) == FILES["model.bin"]


def test_a_folder_cut_short_or_altered_is_refused(folder):
    import fsspec

    write_artifact(folder, "_m.json", FILES, {"kind": "test"})
    fs, root = fsspec.core.url_to_fs(folder)
    manifest = read_artifact(folder, "_m.json", "test artifact")
    fs.pipe_file(f"{root}/rows.parquet", b"abd")  # same size, other bytes
    with pytest.raises(ArtifactError, match="differs from the digest"):
        read_file(folder, "rows.parquet", manifest)
    fs.pipe_file(f"{root}/model.bin", b"\x00" * 10)  # a copy cut short
    with pytest.raises(ArtifactError, match="model.bin is missing or not 1000 bytes"):
        read_artifact(folder, "_m.json", "test artifact")
    fs.rm(f"{root}/_m.json")
    with pytest.raises(ArtifactError, match="is not a test artifact: it has no _m.json"):
        read_artifact(folder, "_m.json", "test artifact")


def test_rewriting_removes_the_old_manifest_before_any_file(tmp_path, monkeypatch):
    folder = str(tmp_path / "artifact")
    write_artifact(folder, "_m.json", FILES, {"kind": "test"})

    def interrupted(fs, path, data):  # the writer dies at its first file
        raise KeyboardInterrupt

    monkeypatch.setattr("pipelines.artifact.write_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_artifact(folder, "_m.json", {"model.bin": b"new"}, {"kind": "test"})
    with pytest.raises(ArtifactError, match="has no _m.json"):
        read_artifact(folder, "_m.json", "test artifact")


def test_a_sealed_folder_records_its_data_files_only(tmp_path):
    (tmp_path / "out" / "part").mkdir(parents=True)
    (tmp_path / "out" / "part" / "a.parquet").write_bytes(b"1234")
    (tmp_path / "out" / "b.json").write_bytes(b"{}")
    (tmp_path / "out" / "_SUCCESS").write_bytes(b"")
    (tmp_path / "out" / ".hidden").write_bytes(b"x")
    seal_artifact(str(tmp_path / "out"), "_m.json", {"kind": "sealed"})
    recorded = json.loads((tmp_path / "out" / "_m.json").read_text())["files"]
    assert recorded == {"part/a.parquet": {"bytes": 4, "sha256": None}, "b.json": {"bytes": 2, "sha256": None}}
    assert read_file(str(tmp_path / "out"), "part/a.parquet", read_artifact(str(tmp_path / "out"), "_m.json", "x"))


def test_a_lease_and_the_temporary_of_a_lease_cut_short_are_no_entries_of_a_folder(tmp_path):
    (tmp_path / LEASE_FILE).write_text("{}")
    (tmp_path / f".{LEASE_FILE}.tmp-0123abcd").write_text("{")  # a run killed while it took the lease
    assert check_folder(str(tmp_path), "teacher cache", lambda name: False) is False  # new: nothing of its own
    (tmp_path / ".notes.tmp-0123abcd").write_text("x")  # any other temporary is an entry like any other
    with pytest.raises(ArtifactError, match="holds no teacher cache"):
        check_folder(str(tmp_path), "teacher cache", lambda name: False)
