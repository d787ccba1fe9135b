"""benchmarks/suite_cpu.py: each test's CPU time and wall time, as a real pytest run in a subprocess measures them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from suite_cpu import per_file, process_kind, report, timeline

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "suite_cpu.py"
SAMPLE = """
import time


def test_burns():
    end = time.process_time() + 0.5
    while time.process_time() < end:
        pass


def test_waits():
    time.sleep(0.5)
"""


def test_a_test_that_burns_its_core_counts_its_cpu_time_and_one_that_waits_its_wall_time(tmp_path):
    # folders with a conftest.py of their own, as the suite's: pytest then sets plugins apart per folder, by hash
    for name in ("other", "sub"):
        (tmp_path / "tests" / name).mkdir(parents=True)
        (tmp_path / "tests" / name / "conftest.py").write_text("LOCAL = 1\n")
    sample = tmp_path / "tests" / "sub" / "test_sample.py"
    sample.write_text(SAMPLE)
    out = tmp_path / "tests.jsonl"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "tests"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    found = {json.loads(line)["test"].split("::")[1]: json.loads(line) for line in out.read_text().splitlines()}
    assert set(found) == {"test_burns", "test_waits"}
    # the machine's busy time includes the test's own 0.5 CPU seconds (and whatever else ran meanwhile)
    assert found["test_burns"]["cpu_s"] >= 0.45 and found["test_burns"]["wall_s"] >= 0.45
    assert found["test_waits"]["wall_s"] >= 0.5
    assert "2 tests: " in done.stdout and "test_sample.py::test_burns" in done.stdout


def test_files_sum_their_tests_and_the_report_lists_the_costliest_first():
    tests = {"a.py::x": (2.0, 1.0), "a.py::y": (1.0, 3.0), "b.py::z": (5.0, 0.5)}
    assert per_file(tests) == {"a.py": (3.0, 4.0, 2), "b.py": (5.0, 0.5, 1)}
    table = report(tests, top=2).splitlines()
    assert table[2].endswith("| a.py::y |") and table[3].endswith("| a.py::x |")
    assert not any("b.py::z" in line for line in table)  # third by CPU time: not in the top 2
    assert any(line.endswith("| 2 | a.py |") for line in table) and table[-1].startswith("3 tests: 4.5 CPU s in 8.0 s")


BURNER = """
import time

end = time.process_time() + 0.6
while time.process_time() < end:
    pass
"""
SPAWNS = """
import subprocess
import sys
from pathlib import Path


def test_spawns_a_burner():
    subprocess.run([sys.executable, "-u", str(Path(__file__).with_name("burner.py")), "now"], check=True)
"""


def test_the_processes_a_test_starts_are_counted_by_kind_also_on_xdist_workers(tmp_path):
    (tmp_path / "burner.py").write_text(BURNER)
    (tmp_path / "test_spawns.py").write_text(SPAWNS)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "test_spawns.py"), "--processes", "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {line.split(" | ")[-1].rstrip(" |"): line for line in done.stdout.splitlines() if line.startswith("| ")}
    burner = rows["burner.py now"].strip("| ").split(" | ")
    assert 0.5 <= float(burner[0]) <= 1.5 and burner[1] == "1"  # its own 0.6 CPU s, one process
    assert "the run: " in done.stdout
    assert "| CPU s | wall s |" not in done.stdout  # on pytest-xdist workers: no figures per test
    (sampling,) = re.findall(r"^the sampling of processes: (\d+\.\d) CPU s \(in no row above\)$", done.stdout, re.M)
    (script,) = [line.strip("| ").split(" | ") for kind, line in rows.items() if kind.startswith("suite_cpu.py ")]
    assert float(sampling) >= 0 and float(script[0]) >= 0  # this process without its sampling: never below zero


WAITS = """
import time


def test_waits():
    time.sleep(0.6)
"""


def test_on_xdist_workers_each_workers_files_and_end_are_told(tmp_path):
    for name in ("test_one.py", "test_two.py"):
        (tmp_path / name).write_text(WAITS)
    command = [sys.executable, str(SCRIPT), str(tmp_path), "--workers", "2", "--min-file-s", "0.5"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [line.strip("| ").split(" | ") for line in done.stdout.splitlines() if line.startswith("| gw")]
    workers = [row for row in rows if len(row) == 4 and not row[3].endswith(".py")]
    files = [row for row in rows if row[3].endswith(".py")]
    assert {row[0] for row in workers} <= {"gw0", "gw1"} and sum(int(row[1]) for row in workers) == 2
    assert all(float(row[2]) >= 0.6 and float(row[3]) >= float(row[2]) for row in workers)  # its tests' time, end
    assert sorted(Path(row[3]).name for row in files) == ["test_one.py", "test_two.py"]  # each file under one worker
    assert all(float(row[2]) - float(row[1]) >= 0.5 for row in files)  # 0.6 s, start and end each rounded to 0.1 s


def test_the_timeline_orders_each_workers_files_and_leaves_out_the_short_ones():
    spans = {
        "a.py::x": ("gw0", 100.0, 112.0),
        "a.py::y": ("gw0", 112.0, 130.0),
        "b.py::z": ("gw0", 130.0, 131.0),
        "c.py::w": ("gw1", 100.5, 160.0),
    }
    table = timeline(spans, started=100.0).splitlines()
    assert table[2] == "| gw0 | 3 | 31.0 | 31.0 |" and table[3] == "| gw1 | 1 | 59.5 | 60.0 |"
    assert table[-2:] == ["| gw0 | 0.0 | 30.0 | a.py |", "| gw1 | 0.5 | 60.0 | c.py |"]  # b.py: 1 s, left out


def test_a_process_is_named_by_its_ray_title_or_its_program():
    assert process_kind(["ray::RayTrainWorker.get_metadata"]) == "ray::RayTrainWorker"
    assert process_kind(["ray::MapWorker(MapBatches(TeacherEmbedder)).__init__"]) == (
        "ray::MapWorker(MapBatches(TeacherEmbedder))"
    )
    assert process_kind(["ray::MapBatches(_list_folder)->MapBatches(admit_batch)"]) == (
        "ray::MapBatches(_list_folder)->MapBatches(admit_batch)"
    )
    assert process_kind(["ray::SERVE_REPLICA::isa#Query#ad7itmo4:ServeReplica:isa:Query.__init__"]) == (
        "ray::SERVE_REPLICA::isa#Query:ServeReplica:isa:Query"
    )
    assert process_kind(["/venv/bin/python3", "/venv/bin/mlflow", "server", "--port", "5000"]) == "mlflow server"
    assert process_kind(["/venv/bin/python", "-u", "-m", "pipelines.cli", "train"]) == "python -m pipelines.cli"
    assert process_kind(["/venv/bin/python", "-X", "importtime", "-c", "import torch"]) == "python -c"
    assert process_kind(["/venv/lib/ray/core/src/ray/raylet/raylet", "--node_ip_address=127.0.0.1"]) == "raylet"
    assert process_kind(["/venv/bin/python3 -u worker.py --node-ip-address=127.0.0.1"]) == "python3"  # a title
    assert process_kind([]) == "?"
