"""``isa train``'s production step on 2 gloo workers against 1 process on the whole batch: every rank holds the
same temperature and student weights, and the loss is the single-process loss."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
from _gloo import run_ranks  # noqa: E402
from _train_step_worker import STEPS, run  # noqa: E402

from isa.config import load_config  # noqa: E402
from pipelines.train.loop import build  # noqa: E402


def test_two_workers_step_as_one_process_on_the_whole_batch(tmp_path):
    worker = TESTS / "_train_step_worker.py"
    run_ranks(worker, lambda rank: [str(tmp_path / "init"), str(rank), str(tmp_path / "out.pt")])
    rank0, rank1 = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.set_num_threads(1)
    single = run(rank=0, world=1)

    assert rank0["temperature"] == rank1["temperature"]  # synchronized, not merely close
    assert torch.equal(rank0["params"], rank1["params"])
    initial = math.log(1 / load_config(None, []).loss.init_temperature)
    assert abs(single["temperature"] - initial) > 1e-3  # the temperature did learn in these steps
    assert rank0["temperature"] == pytest.approx(single["temperature"], rel=1e-4)
    two = [(a + b) / 2 for a, b in zip(rank0["losses"], rank1["losses"])]  # each rank's mean over its half
    assert len(two) == STEPS
    torch.testing.assert_close(torch.tensor(two), torch.tensor(single["losses"]), rtol=1e-4, atol=1e-5)


def test_the_temperature_is_clamped_into_its_bounds_after_a_step():
    from _train_step_worker import OVERRIDES, batches

    from pipelines.train.loop import step

    config = load_config(None, [*OVERRIDES, "loss.min_temperature=0.05", "loss.max_temperature=0.5"])
    worker = build(config, 0, 1, torch.device("cpu"), total=2)
    with torch.no_grad():
        worker.task.logit_scale.fill_(math.log(1 / 0.001))  # far past the bound: the clamped forward has no gradient
    step(worker, batches(1)[0])
    assert worker.task.logit_scale.item() == pytest.approx(math.log(1 / 0.05))
    with torch.no_grad():
        worker.task.logit_scale.fill_(math.log(1 / 5.0))
    step(worker, batches(1)[0])
    assert worker.task.logit_scale.item() == pytest.approx(math.log(1 / 0.5))
