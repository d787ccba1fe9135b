"""The per-worker loop of ``isa train``, run inside each Ray Train worker: step, record, checkpoint, validate.

Each worker holds the frozen teacher (never in DDP) and the student (DDP when there are several workers); GCD
gathers the global batch. Rank 0 validates, writes checkpoints, records to MLflow and prints each record as one
line (every ``train.log_every`` steps and at each checkpoint); every rank calls ``ray.train.report`` at the
checkpoints (it is a barrier).

Resume: a checkpoint restores the weights, optimizer, LR schedule, step count and RNG state. The data stream
(all the run's passes over the training split, :func:`pipelines.train.data.datasets`) starts again from its
first pass, with new random crops and batches; the run still ends at the same total step count, so a resumed
run takes as many optimizer steps, on the same schedule, as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import posixpath
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import ray.train
import ray.train.collective
import ray.train.torch
import ray.util
import torch

from isa.augment import to_unit_range
from isa.build import build_student, build_task, build_teacher
from isa.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from isa.config import Config, flatten, from_dict, saved_dict
from isa.retrieval import image_retrieval_recall
from isa.schedule import warmup_cosine
from isa.shuffle import mixed_batches
from isa.task import DistillTask, parameter_groups
from pipelines.console import quiet_worker
from pipelines.tracking import RankZeroTracker
from pipelines.train import metrics as names

PENDING_FILE = "mlflow_pending.jsonl"  # in a checkpoint: the MLflow records not yet taken when it was saved
SETTLE_S = 10.0  # at a checkpoint, the longest wait for an answering MLflow to take the records queued before it
PROCESS_GROUP_TIMEOUT_S = 1800  # a collective waits this long for the slowest rank (TorchTrainer's default)
SHUFFLE_BATCHES = 4  # the batches each batch's rows are drawn from
Batch = TypeVar("Batch")


class InputWait:
    """The seconds a loop has spent waiting for its next batch: the share of the run its input held it back."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._mark = (0.0, time.perf_counter())  # (seconds waited, time) at the last share()

    def timed(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """The batches, each one's wait added to :attr:`seconds` (the loop's own time between them is not)."""
        iterator = iter(batches)
        while True:
            began = time.perf_counter()
            batch = next(iterator, None)
            self.seconds += time.perf_counter() - began
            if batch is None:
                return
            yield batch

    def share(self) -> float:
        """The share of the time since the last call (or since this was made) spent waiting for batches."""
        now = time.perf_counter()
        waited, since = self._mark
        self._mark = (self.seconds, now)
        return (self.seconds - waited) / max(now - since, 1e-9)


@dataclass
class Worker:
    """One training worker's state: what it trains, where it is, and what it has not recorded yet."""

    config: Config
    rank: int
    world: int
    device: torch.device
    task: DistillTask
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total: int  # the run's optimizer steps
    step: int = 0
    tracker: RankZeroTracker = field(default_factory=lambda: RankZeroTracker(False, "", "", "", None))
    saved_config: dict = field(default_factory=dict)  # a checkpoint's config.json: config and teacher fingerprint
    window: dict[str, torch.Tensor] = field(default_factory=dict)  # loss name -> sum since the last record
    window_steps: int = 0
    clock: float | None = None  # end of this process's first step
    samples: int = 0  # samples of every worker since then
    input_wait: InputWait = field(default_factory=InputWait)
    run_dir: str = ""  # the run folder, absolute (the worker runs in another folder than the driver)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def local_batch(self) -> int:
        return self.config.train.global_batch_size // self.world


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. ``loop_config``: config, teacher fingerprint, total steps, tracking URI, run name,
    run folder (absolute), MLflow tags of a new run."""
    quiet_worker()
    worker = start(from_dict(loop_config["config"]), loop_config)
    # the held-out views, read before the training stream starts: at the end of a run they would start a data
    # task beside a worker that holds its largest memory (the peak of the quickstart)
    held_out = read_held_out(worker)
    every, log_every = worker.config.train.checkpoint_every, worker.config.train.log_every
    try:
        for batch in batches(worker):
            step(worker, batch)
            if worker.step % every == 0 or worker.step == worker.total:
                metrics = {**record(worker), **validate(worker, held_out)}
                checkpoint(worker, metrics)
                say(worker, metrics, checkpoint=True)
            elif worker.step % log_every == 0:
                metrics = record(worker)
                worker.tracker.metrics(metrics, worker.step)
                say(worker, metrics, checkpoint=False)
    except BaseException:
        # the process ends with the error: the records queued so far (the run itself, when it fails early) reach an
        # answering MLflow first, so the driver finds the run and ends it FAILED
        worker.tracker.settle(SETTLE_S)
        raise
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def start(config: Config, loop_config: dict[str, Any]) -> Worker:
    """Join the process group; build the worker; restore the last checkpoint; wrap the student in DDP; open the
    record."""
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu" and config.train.torch_threads:
        # Ray sets one thread per reserved CPU; light data tasks can leave the rest of a small machine idle
        torch.set_num_threads(config.train.torch_threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # the step's shapes never change: the fastest convolutions, found once
    join_process_group("nccl" if device.type == "cuda" else "gloo", rank, world)
    worker = build(config, rank, world, device, loop_config["total_steps"])
    worker.step, run_id, kept = restore(worker.task, worker.optimizer, worker.scheduler, loop_config["run_dir"])
    distribute(worker)
    worker.tracker = RankZeroTracker(
        rank == 0 and worker.step < worker.total,  # a finished run (restored with no step left) is left as it was
        loop_config["tracking_uri"],
        config.train.experiment,
        loop_config["run_name"],
        run_id,
        loop_config.get("mlflow_tags"),
        kept,
    )
    if worker.step == 0:
        worker.tracker.params(flatten(config))
    worker.task.train()
    worker.saved_config = {"config": saved_dict(config), "teacher": loop_config["fingerprint"]}
    worker.run_dir = loop_config["run_dir"]
    return worker


def build(config: Config, rank: int, world: int, device: torch.device, total: int) -> Worker:
    """One worker's teacher, student, task, optimizer and schedule, before any checkpoint or DDP."""
    torch.manual_seed(config.train.seed + rank)
    teacher = build_teacher(config.teacher, device)
    task = build_task(config, teacher, build_student(config, teacher), rank, world).to(device)
    groups = parameter_groups(
        task, config.train.lr, config.train.backbone_lr, config.train.weight_decay, config.student.pretrained
    )
    optimizer = torch.optim.AdamW(groups, fused=device.type == "cuda")  # fused: one kernel for all parameters
    warmup = math.ceil(config.train.warmup_fraction * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup))
    return Worker(config, rank, world, device, task, optimizer, scheduler, total)


def distribute(worker: Worker) -> None:
    """DDP on the student only (the teacher stays frozen outside it), on more than one worker: it starts every
    rank from rank 0's weights and averages the student's gradients; :func:`step` does the same for the
    temperature, which lives in the task."""
    if worker.world > 1:
        device_ids = [worker.device.index] if worker.gpu else None
        worker.task.student = torch.nn.parallel.DistributedDataParallel(worker.task.student, device_ids=device_ids)


def join_process_group(backend: str, rank: int, world: int) -> None:
    """torch.distributed over the run's workers (none for one worker), at rank 0's address.

    Rank 0 picks a free port on its node and Ray Train's collective hands the address to the other ranks. A
    worker that dies takes the whole group down; Ray Train restarts every worker, and they join anew.
    """
    if world == 1 or torch.distributed.is_initialized():
        return
    address = None
    if rank == 0:
        with socket.socket() as probe:
            probe.bind(("", 0))
            address = f"tcp://{ray.util.get_node_ip_address()}:{probe.getsockname()[1]}"
    address = ray.train.collective.broadcast_from_rank_zero(address)
    if backend == "nccl":  # a collective that times out fails the run instead of hanging it
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S)
    torch.distributed.init_process_group(backend, init_method=address, rank=rank, world_size=world, timeout=timeout)


def restore(
    task: DistillTask, optimizer: torch.optim.Optimizer, scheduler: Any, run_dir: str
) -> tuple[int, str | None, list[dict]]:
    """The weights, optimizer, schedule and RNG state of the run folder's newest complete checkpoint, else of
    Ray Train's; its step, MLflow run and the MLflow records it kept unsent (0, None, []: no checkpoint).

    The run folder first: a worker that dies after its checkpoint reached storage and before Ray Train took its
    report leaves Ray Train an older one (none at the first), and a restart from that would train and record
    again steps the run already recorded.
    """
    with contextlib.ExitStack() as stack:
        folder = saved_folder(run_dir, stack.enter_context(tempfile.TemporaryDirectory()))
        if folder is None:
            checkpoint = ray.train.get_checkpoint()
            if checkpoint is None:
                return 0, None, []
            folder = stack.enter_context(checkpoint.as_directory())
        saved = load_checkpoint(Path(folder) / "isa")
        pending = Path(folder) / PENDING_FILE
        kept = [json.loads(line) for line in pending.read_text().splitlines()] if pending.is_file() else []
    task.load_trainable_state_dict(saved.weights)
    optimizer.load_state_dict(saved.optimizer["optimizer"])
    scheduler.load_state_dict(saved.optimizer["scheduler"])
    restore_rng_state(saved.state["rng"])
    return int(saved.state["step"]), saved.state.get("mlflow_run_id"), kept


def saved_folder(run_dir: str, scratch: str) -> str | None:
    """The local folder of the run folder's newest complete ``checkpoint_*`` (copied into ``scratch`` from remote
    storage); None: none there."""
    from isa.checkpoint_files import latest_checkpoint
    from isa.storage import filesystem

    fs, path = filesystem(run_dir)
    found = latest_checkpoint(fs, path)  # RUN_DIR/checkpoint_*/isa
    if found is None:
        return None
    folder = posixpath.dirname(found)
    if "://" not in run_dir:
        return folder
    fs.get(folder.rstrip("/") + "/", scratch, recursive=True)
    return scratch


def batches(worker: Worker) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's batches until the run's last step, each of ``local_batch`` rows.

    Rows are mixed across a few batches, so batches (and their in-batch negatives) differ every pass. On a GPU
    they are mixed there (:mod:`isa.shuffle`) and come in pinned host memory, so Ray's copy to the device (in
    its prefetch thread) runs asynchronously; on a CPU Ray Data's local shuffle buffer costs less than the pool
    (``benchmarks/train_ingest.py``).
    """
    shard = ray.train.get_dataset_shard("train")
    size = worker.local_batch
    while worker.step < worker.total:
        stream = shard.iter_torch_batches(
            batch_size=size,
            drop_last=True,
            local_shuffle_buffer_size=None if worker.gpu else SHUFFLE_BATCHES * size,
            pin_memory=worker.gpu,
        )
        stream = worker.input_wait.timed(stream)
        for batch in mixed_batches(stream, SHUFFLE_BATCHES) if worker.gpu else stream:
            yield batch
            if worker.step >= worker.total:
                return


def step(worker: Worker, batch: dict[str, torch.Tensor]) -> None:
    """One optimizer step on a batch; its losses are summed on the device (no host sync per step)."""
    images = to_unit_range(batch["view"].to(worker.device), worker.config.student.image_size)  # (B, 3, S, S)
    emb = batch["teacher_emb"].to(worker.device)  # (B, D)
    local, cells = batch.get("teacher_local"), batch.get("cells")
    if local is not None:
        local = local.to(worker.device).view(emb.shape[0], -1, emb.shape[1])  # (B, G, D)
    if cells is not None:
        cells = cells.to(worker.device).view(emb.shape[0], -1, 4)  # (B, G, 4): the teacher's cells in each view
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=worker.gpu):
        losses = worker.task(images, emb, local, cells)
    worker.optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()  # DDP averages the student's gradients across the workers
    average_temperature_gradient(worker)
    if worker.config.train.grad_clip > 0:  # the same gradients on every rank: the same clipping
        torch.nn.utils.clip_grad_norm_(worker.task.trainable_parameters(), worker.config.train.grad_clip)
    worker.optimizer.step()
    worker.task.clamp_temperature_()
    worker.scheduler.step()
    worker.step += 1
    if worker.clock is None:  # the rate counts from the end of this process's first step (start-up excluded)
        worker.clock = time.perf_counter()
    else:
        worker.samples += worker.local_batch * worker.world
    for name, value in losses.items():
        worker.window[name] = worker.window.get(name, 0.0) + value.detach().float()
    worker.window_steps += 1


def average_temperature_gradient(worker: Worker) -> None:
    """The temperature's gradient averaged over the workers, as DDP averages the student's, so every rank takes
    the same step and holds the same temperature."""
    grad = worker.task.logit_scale.grad
    if worker.world > 1 and grad is not None:
        torch.distributed.all_reduce(grad)
        grad /= worker.world


def record(worker: Worker) -> dict[str, float]:
    """The losses averaged over the steps since the last record, the learning rate, throughput and input wait."""
    losses = {name: float(value) / worker.window_steps for name, value in worker.window.items()}
    worker.window, worker.window_steps = {}, 0
    rate = worker.samples / max(time.perf_counter() - worker.clock, 1e-9)
    # on a GPU, an upper bound of the device's wait for input (it may still run the steps queued ahead)
    return names.record(losses, worker.scheduler.get_last_lr()[0], rate, worker.input_wait.share())


def say(worker: Worker, metrics: dict[str, float], checkpoint: bool) -> None:
    """Rank 0 prints the record as one line (Ray shows it on the driver's output, prefixed with the worker)."""
    if worker.rank == 0:
        steps_per_s = metrics[names.SAMPLES_PER_S] / (worker.local_batch * worker.world)
        print(names.step_line(worker.step, worker.total, metrics, steps_per_s, checkpoint), flush=True)


def read_held_out(worker: Worker) -> list[dict[str, torch.Tensor]] | None:
    """Rank 0's held-out views and teacher embeddings (at most ``train.val_images``); None: no validation here."""
    train = worker.config.train
    if worker.rank != 0 or train.val_fraction <= 0 or train.val_images <= 0:
        return None
    return list(ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=worker.local_batch))


def validate(worker: Worker, held_out: list[dict[str, torch.Tensor]] | None) -> dict[str, float]:
    """Image-only retrieval on the held-out split: ``a photo of {S}`` against the teacher gallery (rank 0)."""
    if not held_out:
        return {}
    queries, gallery = [], []
    task = worker.task
    task.eval()
    with torch.no_grad():
        for batch in held_out:
            # the bare module: a DDP forward would wait for a collective the other ranks never join
            views = to_unit_range(batch["view"].to(worker.device), worker.config.student.image_size)
            queries.append(task.query(task.student_module(views).sentence))
            gallery.append(batch["teacher_emb"].to(worker.device).float())
    task.train()
    return names.validation_record(image_retrieval_recall(torch.cat(queries), torch.cat(gallery), ks=(1, 5)))


def checkpoint(worker: Worker, metrics: dict[str, float]) -> None:
    """Rank 0 records and saves a checkpoint; every rank reports (the last checkpoint also closes the record).

    The checkpoint keeps the MLflow records not taken yet (MLflow down or slow): a run resumed from it sends them
    first, and the records after it are made again by the resumed run, so none is lost or doubled.
    """
    with tempfile.TemporaryDirectory() as folder:
        saved = None
        if worker.rank == 0:
            worker.tracker.metrics(metrics, worker.step)
            pending = worker.tracker.settle(SETTLE_S)
            state = {
                "step": worker.step,
                "total_steps": worker.total,
                "rng": capture_rng_state(),
                "mlflow_run_id": worker.tracker.run_id,
            }
            optimizer = {"optimizer": worker.optimizer.state_dict(), "scheduler": worker.scheduler.state_dict()}
            weights = worker.task.trainable_state_dict()
            path = save_checkpoint(
                Path(folder) / "isa", config=worker.saved_config, weights=weights, state=state, optimizer=optimizer
            )
            if worker.step == worker.total:  # the run's end: the records not taken now are kept in the run folder
                train = worker.config.train
                worker.tracker.finish(
                    path,
                    worker.saved_config,
                    train.register_model,
                    train.model_alias,
                    train.tracking_wait_s,
                    worker.run_dir,
                )
                pending = []
            if pending:
                (Path(folder) / PENDING_FILE).write_text("".join(json.dumps(record) + "\n" for record in pending))
            saved = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({**metrics, names.STEP: worker.step}, checkpoint=saved)
