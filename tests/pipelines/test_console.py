"""What the stages print, checked without Ray: the progress switch, the step line, the silenced warnings."""

from __future__ import annotations

import io
import re
import warnings

import pytest
from PIL import Image

from isa.config import ConfigError
from pipelines import console
from pipelines.cli import main
from pipelines.train import metrics


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_only_where_both_streams_are_terminals_unless_forced():
    terminal, file = _Terminal(), io.StringIO()
    assert console.progress_wanted({}, [terminal, terminal])
    assert not console.progress_wanted({}, [terminal, file])  # e.g. `isa train > log`
    assert not console.progress_wanted({}, [file, file])
    assert not console.progress_wanted({}, [terminal, None])  # no stream at all (a daemon)
    for value in ("1", "true", "ON", " yes "):
        assert console.progress_wanted({"ISA_PROGRESS": value}, [file, file])
    for value in ("0", "false", "off", "No"):
        assert not console.progress_wanted({"ISA_PROGRESS": value}, [terminal, terminal])
    assert not console.progress_wanted({"ISA_PROGRESS": ""}, [file, file])  # set but empty: as unset
    with pytest.raises(ConfigError, match=r"ISA_PROGRESS='maybe': use 1 \(progress bars\) or 0"):
        console.progress_wanted({"ISA_PROGRESS": "maybe"}, [terminal, terminal])


def test_an_invalid_progress_switch_is_refused_before_ray_starts(tmp_path, monkeypatch, capsys):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "one.png")
    monkeypatch.setenv("ISA_PROGRESS", "maybe")
    teacher = ["--teacher", "isa-tiny-ViT", "--pretrained", "none"]
    code = main(["embed", str(tmp_path / "images"), str(tmp_path / "cache"), *teacher])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("isa embed: error: ISA_PROGRESS='maybe': use 1") and error.count("\n") == 1
    assert not (tmp_path / "cache").exists()


def test_only_the_listed_dependency_warnings_are_silenced():
    from ray.util.annotations import RayDeprecationWarning

    sent = [
        ("`ray_remote_args_fn` is deprecated and will be removed in Ray 2.64.", RayDeprecationWarning),
        ("The maximum number of concurrent tasks for 'MapBatches(write_shard)' is set to 2", UserWarning),
        ("`ray_remote_args` is deprecated and will be removed in Ray 2.64.", RayDeprecationWarning),
        ("The maximum number of concurrent tasks for 'MapBatches(decode_batch)' is set to 2", UserWarning),
        ("`ray_remote_args_fn` is deprecated", UserWarning),  # the message, of another category
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.silence_dependency_warnings()
        for message, category in sent:
            warnings.warn(message, category, stacklevel=1)
    assert [str(w.message) for w in caught] == [message for message, _ in sent[2:]]
    assert all(reason for *_, reason in console.DEPENDENCY_WARNINGS)  # each one says why


def test_the_step_line_names_the_losses_throughput_time_left_and_checkpoints():
    record = metrics.record({"loss": 4.0796, "gcd": 3.0873, "lar": 3.3076, "temperature": 0.07}, 1e-3, 123.8, 0.01)
    line = metrics.step_line(20, 40, record, steps_per_s=2.0, checkpoint=False)
    assert line == "step 20/40 · loss 4.080 (gcd 3.09, lar 3.31) · 124 samples/s · ETA 0:00:10"
    validated = {**record, "val_image_R1": 3.6364, "val_image_R5": 9.0909}
    line = metrics.step_line(40, 40, validated, steps_per_s=2.0, checkpoint=True)
    assert line.endswith("· ETA 0:00:00 · val R@1 3.6, R@5 9.1 · checkpoint")
    first = metrics.record({"loss": 4.0, "gcd": 4.0, "temperature": 0.07}, 1e-3, 0.0, 0.0)  # no rate yet
    assert metrics.step_line(1, 3600, first, steps_per_s=0.0, checkpoint=False) == (
        "step 1/3600 · loss 4.000 (gcd 4.00) · samples/s – · ETA –"
    )
    assert re.search(r"ETA 1:00:00$", metrics.step_line(0, 3600, first | {"samples_per_s": 1.0}, 1.0, False))
