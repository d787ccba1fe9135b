"""benchmarks/suite_cpu.py: each test's CPU time and wall time, as a real pytest run in a subprocess measures them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from suite_cpu import per_file, report  # noqa: E402

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
    sample = tmp_path / "test_sample.py"
    sample.write_text(SAMPLE)
    out = tmp_path / "tests.jsonl"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(sample), "--out", str(out)], capture_output=True, text=True, timeout=300
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
