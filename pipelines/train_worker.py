"""The per-worker loop of ``isa train`` (runs inside Ray Train workers).

Each worker holds the frozen teacher (never in DDP) and the student (DDP when there are several
workers); GCD gathers the global batch. Rank 0 validates, writes checkpoints and logs to MLflow;
``ray.train.report`` is called by every rank at the same steps.

Resume semantics: a checkpoint restores the weights, optimizer, LR schedule, step count and RNG state.
The data stream (all the run's passes over the training split, see ``pipelines.train.datasets``) starts
again from its first pass, with new random crops and batches; the run still ends at the same total step
count, so a resumed run sees the same number of optimizer steps and the same schedule as an uninterrupted
one.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import ray.train
import ray.train.torch
import torch

from isa.augment import to_unit_range
from isa.build import build_student, build_task, build_teacher
from isa.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from isa.config import Config, flatten, from_dict, to_dict
from isa.retrieval import image_retrieval_recall
from isa.schedule import warmup_cosine
from isa.shuffle import mixed_batches
from isa.task import DistillTask, parameter_groups

SHUFFLE_BATCHES = 4  # the batches each batch's rows are drawn from
LOG_EVERY = 10  # steps between metric records (the losses are averaged over them)
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


class Tracker:
    """MLflow on rank 0 only; every call is a no-op elsewhere."""

    def __init__(
        self, enabled: bool, uri: str, experiment: str, run_name: str, run_id: str | None, tags: dict | None = None
    ):
        self.enabled = enabled
        self.run_id = run_id
        if not enabled:
            return
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=None if run_id else tags)
        self.run_id = self.run.info.run_id

    def params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            items = [(k, "None" if v is None else str(v)) for k, v in params.items()]
            for start in range(0, len(items), 100):  # MLflow takes at most 100 params a call
                self.mlflow.log_params(dict(items[start : start + 100]))

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            self.mlflow.log_metrics(metrics, step=step)

    def finish(self, checkpoint_dir: Path, config: dict, model_name: str | None, alias: str) -> None:
        """Final checkpoint and config as artifacts; optionally a registered model version with an alias."""
        if not self.enabled:
            return
        self.mlflow.log_artifacts(str(checkpoint_dir), artifact_path="checkpoint")
        self.mlflow.log_dict(config, "config.json")
        if model_name:  # the checkpoint folder is the model: a version whose source is that artifact
            client = self.mlflow.MlflowClient()
            try:
                client.create_registered_model(model_name)
            except self.mlflow.exceptions.MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            source = f"{self.mlflow.get_artifact_uri()}/checkpoint"
            version = client.create_model_version(model_name, source=source, run_id=self.run_id)
            client.set_registered_model_alias(model_name, alias, version.version)
        self.mlflow.end_run()


def _restore(task: DistillTask, optimizer, scheduler) -> tuple[int, str | None]:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, None
    with checkpoint.as_directory() as folder:
        saved = load_checkpoint(Path(folder) / "isa")
    task.load_trainable_state_dict(saved.weights)
    optimizer.load_state_dict(saved.optimizer["optimizer"])
    scheduler.load_state_dict(saved.optimizer["scheduler"])
    restore_rng_state(saved.state["rng"])
    return int(saved.state["step"]), saved.state.get("mlflow_run_id")


def _validation_batches(batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The held-out views and teacher embeddings, read once (at most ``train.val_images`` of them)."""
    return list(ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=batch_size))


def _validate(
    task: DistillTask, batches: list[dict[str, torch.Tensor]], device: torch.device, size: int
) -> dict[str, float]:
    """Image-only retrieval on the held-out split: query ``a photo of {S}`` against the teacher gallery."""
    queries, gallery = [], []
    task.eval()
    with torch.no_grad():
        for batch in batches:
            # the bare module: a DDP forward would wait for a collective the other ranks never join
            sentence = task.student_module(to_unit_range(batch["view"].to(device), size)).sentence
            queries.append(task.query(sentence))
            gallery.append(batch["teacher_emb"].to(device).float())
    task.train()
    if not queries:
        return {}
    recall = image_retrieval_recall(torch.cat(queries), torch.cat(gallery), ks=(1, 5))
    return {f"val_image_{k.replace('@', '')}": v for k, v in recall.items()}


def _save(task: DistillTask, optimizer, scheduler, config: dict, step: int, run_id: str | None, folder: Path) -> Path:
    state = {"step": step, "rng": capture_rng_state(), "mlflow_run_id": run_id}
    optim = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    return save_checkpoint(
        folder / "isa", config=config, weights=task.trainable_state_dict(), state=state, optimizer=optim
    )


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. ``loop_config``: config, teacher fingerprint, total steps, tracking URI, run name."""
    config: Config = from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    gpu = device.type == "cuda"
    if device.type == "cpu" and config.train.torch_threads:
        # Ray sets one thread per reserved CPU; light data tasks can leave the rest of a small machine idle
        torch.set_num_threads(config.train.torch_threads)
    if gpu:
        torch.backends.cudnn.benchmark = True  # the step's shapes never change: the fastest convolutions, found once
    torch.manual_seed(config.train.seed + rank)
    teacher = build_teacher(config.teacher, device)
    task = build_task(config, teacher, build_student(config, teacher), rank, world).to(device)
    groups = parameter_groups(
        task, config.train.lr, config.train.backbone_lr, config.train.weight_decay, config.student.pretrained
    )
    optimizer = torch.optim.AdamW(groups, fused=gpu)  # fused: one kernel for all parameters
    total = loop_config["total_steps"]
    warmup = math.ceil(config.train.warmup_fraction * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup))
    step, run_id = _restore(task, optimizer, scheduler)
    if world > 1:
        task.student = ray.train.torch.prepare_model(task.student)  # DDP on the student only
    tracker = Tracker(
        rank == 0,
        loop_config["tracking_uri"],
        config.train.experiment,
        loop_config["run_name"],
        run_id,
        loop_config.get("mlflow_tags"),
    )
    saved_config = {"config": to_dict(config), "teacher": loop_config["fingerprint"]}
    if step == 0:
        tracker.params(flatten(config))
    local_batch = config.train.global_batch_size // world
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu)
    task.train()
    # the held-out views, read before the training stream starts: at the end of a run they would start a data
    # task beside a worker that holds its largest memory (the peak of the quickstart)
    validated = rank == 0 and config.train.val_fraction > 0 and config.train.val_images > 0
    validation = _validation_batches(local_batch) if validated else None
    clock, samples = None, 0
    input_wait = InputWait()
    window: dict[str, torch.Tensor | float] = {}  # loss name -> sum over the steps since the last record
    window_steps = 0
    shard = ray.train.get_dataset_shard("train")
    while step < total:
        # rows mixed across a few batches, so batches (and their in-batch negatives) differ every pass. On a GPU
        # they are mixed there (isa/shuffle.py) and come in pinned host memory, so Ray's copy to the device (in its
        # prefetch thread) runs asynchronously; on a CPU Ray Data's local shuffle buffer costs less than the pool
        # (benchmarks/train_ingest.py)
        shuffle = None if gpu else SHUFFLE_BATCHES * local_batch
        stream = shard.iter_torch_batches(
            batch_size=local_batch, drop_last=True, local_shuffle_buffer_size=shuffle, pin_memory=gpu
        )
        stream = input_wait.timed(stream)
        batches = mixed_batches(stream, SHUFFLE_BATCHES) if gpu else stream
        for batch in batches:
            images = to_unit_range(batch["view"].to(device), config.student.image_size)  # (B, 3, S, S)
            emb = batch["teacher_emb"].to(device)  # (B, D)
            local = (
                batch["teacher_local"].to(device).view(emb.shape[0], -1, emb.shape[1])
                if "teacher_local" in batch
                else None
            )
            with autocast:
                losses = task(images, emb, local)  # local: (B, G, D)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if config.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(task.trainable_parameters(), config.train.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            if clock is None:  # the rate counts from the end of this process's first step (start-up excluded)
                clock = time.perf_counter()
            else:
                samples += local_batch * world
            for name, value in losses.items():  # summed on the device: no host sync per step
                window[name] = window.get(name, 0.0) + value.detach().float()
            window_steps += 1
            checkpoint_due = step % config.train.checkpoint_every == 0 or step == total
            if not (checkpoint_due or step % LOG_EVERY == 0):
                continue
            # the losses averaged over the steps since the last record
            metrics = {name: float(total_value) / window_steps for name, total_value in window.items()}
            window, window_steps = {}, 0
            metrics["lr"] = scheduler.get_last_lr()[0]
            metrics["samples_per_s"] = samples / max(time.perf_counter() - clock, 1e-9)
            # since the last record: on a GPU, an upper bound of the device's wait for input (it may still be
            # running the steps queued ahead while the host waits)
            metrics["input_wait_fraction"] = input_wait.share()
            if checkpoint_due:
                with tempfile.TemporaryDirectory() as tmp:
                    checkpoint = None
                    if rank == 0:
                        if validation is not None:
                            metrics.update(_validate(task, validation, device, config.student.image_size))
                        folder = _save(task, optimizer, scheduler, saved_config, step, tracker.run_id, Path(tmp))
                        checkpoint = ray.train.Checkpoint.from_directory(tmp)
                        tracker.metrics(metrics, step)
                        if step == total:
                            tracker.finish(folder, saved_config, config.train.register_model, config.train.model_alias)
                    ray.train.report({**metrics, "step": step}, checkpoint=checkpoint)
            else:
                tracker.metrics(metrics, step)
            if step >= total:
                break
