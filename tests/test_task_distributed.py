"""Gather correctness of the whole task: 2 gloo processes on halves of a batch equal 1 process on all of it."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _gloo import run_ranks  # noqa: E402
from _task_worker import losses_and_grads  # noqa: E402


def test_two_processes_give_the_single_process_loss_and_gradients(tmp_path):
    worker = Path(__file__).with_name("_task_worker.py")
    run_ranks(worker, lambda rank: [str(tmp_path / "init"), str(rank), str(tmp_path / "out.pt")])
    two = torch.load(tmp_path / "out.pt", weights_only=True)
    loss, grad = losses_and_grads(rank=0, world=1)
    torch.testing.assert_close(two["loss"], loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(two["grad"], grad, rtol=1e-3, atol=1e-5)
    assert grad.abs().max() > 1e-2  # the gradients are not trivially small
