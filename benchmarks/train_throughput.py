"""Samples/s of ``isa train`` against a plain single-process PyTorch loop, side by side in one run.

Both train the same student with the same teacher, batch and augmentation on the same teacher cache;
the plain loop reads the cache with pyarrow and decodes/augments in its own process. The overhead is
``1 - isa / plain``, with the plain loop run before and after each ``isa train`` run and averaged; ``--rounds``
runs of ``isa train`` (default 3) give as many overheads and their median (target ≤ 15 % on CPU,
benchmarks/RESULTS.md). On a GPU the target is the rate itself:
≥ 3,000 samples/s at efficientnet_b0, M=4 and the ViT-L-14 text tower.

    python benchmarks/train_throughput.py --cache CACHE --steps 60
    python benchmarks/train_throughput.py --make-cache --steps 60          # synthetic world, tiny teacher
    python benchmarks/train_throughput.py --device cuda --make-cache --cache-images 8000 --steps 150 \
        --plain-steps 40 --step-only 30 --profile 5 --rounds 1

Where a rate falls short, two figures say why: the share of ``isa train``'s time its worker waited for
input batches (its ``input_wait_fraction`` records), and with ``--profile`` the share of a step's time
the step's kernels keep the GPU busy (well below 100 %: the host queueing kernels is the bound).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from embed_throughput import make_jpegs, measured  # this folder's photo-like JPEGs and figure printing

from isa.augment import to_unit_range, train_view, views
from isa.build import build_student, build_task, build_teacher
from isa.config import Config, load_config
from isa.task import parameter_groups

TINY_TEACHER = "isa-tiny-ViT"


class Trainee:
    """The student task, teacher and AdamW of both in-process loops, and one training step (bf16 on GPU)."""

    def __init__(self, config: Config, device: str):
        self.teacher = build_teacher(config.teacher, device)
        torch.manual_seed(0)
        self.task = build_task(config, self.teacher, build_student(config, self.teacher)).to(device)
        groups = parameter_groups(self.task, config.train.lr, config.train.lr, 0.05, False)
        self.optimizer = torch.optim.AdamW(groups, fused=device == "cuda")  # as isa train's worker
        torch.backends.cudnn.benchmark = device == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
        self.task.train()

    def step(self, images: torch.Tensor, emb: torch.Tensor, local: torch.Tensor) -> None:
        """images (B, 3, S, S) in [0, 1], emb (B, D), local (B, G, D)."""
        with self.autocast:
            loss = self.task(images, emb, local)["loss"]
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.task.trainable_parameters(), 1.0)
        self.optimizer.step()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain_loop(config: Config, cache: str, steps: int, device: str) -> float:
    """One process: pyarrow batches, PIL augmentation, forward/backward/step (bf16 on GPU). Returns samples/s."""
    trainee = Trainee(config, device)
    transform = train_view(config.student.image_size, config.train.crop_scale_min, config.train.hflip)
    columns = ["image", "teacher_emb", "teacher_local"]
    files = sorted(glob.glob(os.path.join(cache, "part-*.parquet")))
    batch_size, size = config.train.global_batch_size, config.student.image_size
    done, started = 0, None
    while done < steps:
        for batch in pq.ParquetDataset(files).read(columns=columns).to_batches(max_chunksize=batch_size):
            if batch.num_rows < batch_size:
                continue
            if done == 1:
                started = time.perf_counter()  # the first step pays one-time costs in both runs
            images = to_unit_range(torch.from_numpy(views(batch["image"].to_pylist(), transform, size)).to(device))
            emb = np.stack(batch["teacher_emb"].to_numpy(zero_copy_only=False)).astype(np.float32)
            local = np.stack(batch["teacher_local"].to_numpy(zero_copy_only=False)).astype(np.float32)
            emb, local = torch.from_numpy(emb).to(device), torch.from_numpy(local).to(device)
            trainee.step(images, emb, local.view(batch_size, -1, emb.shape[1]))
            done += 1
            if done >= steps:
                break
    synchronize(device)
    return (steps - 1) * batch_size / (time.perf_counter() - started)


def step_only(config: Config, steps: int, device: str, local_grid: int, profiled: int = 0) -> float:
    """The training step alone on random tensors already on the device (bf16 autocast on GPU, as ``isa train``
    runs it): the ceiling with no data loading. ``profiled`` more steps then run under torch.profiler, whose
    table and device-busy share are printed (:func:`profile_steps`). Returns samples/s."""
    trainee = Trainee(config, device)
    batch, size, dim = config.train.global_batch_size, config.student.image_size, trainee.teacher.embed_dim
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)  # as the views come
    emb = F.normalize(torch.randn(batch, dim, device=device), dim=-1)
    local = torch.randn(batch, local_grid**2, dim, device=device)

    def step() -> None:
        trainee.step(to_unit_range(images), emb, local)

    for index in range(steps + 3):  # three warm-up steps
        if index == 3:
            synchronize(device)
            started = time.perf_counter()
        step()
    synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    if profiled:
        try:
            profile_steps(step, profiled, device, seconds)
        except Exception as error:  # a diagnostic: the measurements that follow still run
            print(f"profiling failed: {type(error).__name__}: {error}")
    return batch / seconds


def profile_steps(step: Callable[[], None], steps: int, device: str, seconds_per_step: float) -> None:
    """Runs ``steps`` steps under torch.profiler; prints the ops that take the most time (the device's on a GPU)
    and, on a GPU, the share of an unprofiled step's time its kernels keep the device busy: near 100 % the step
    is bound by the device, well below it by the host queueing the kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    gpu = device == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as profiler:
        for _ in range(steps):
            step()
        synchronize(device)
    averages = profiler.key_averages()
    print(averages.table(sort_by="self_device_time_total" if gpu else "self_cpu_time_total", row_limit=15))
    if gpu:
        device_events = [
            e for e in averages if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        ]
        kernels = sum(e.self_device_time_total for e in device_events) / 1e6 / steps  # µs -> s per step
        measured({"kernel ms per step": kernels * 1e3, "step ms unprofiled": seconds_per_step * 1e3})
        print(f"the kernels keep the device busy {kernels / seconds_per_step:.0%} of an unprofiled step")


def isa_train(config: Config) -> tuple[float, float, float]:
    """``isa train`` on a local Ray instance, as its worker measured it.

    Returns:
        samples/s over the whole run (from the end of the first step) and over its second half: the rate
        between the two records of ``samples_per_s`` in MLflow nearest the middle and the end, which leaves
        out the data pipeline's ramp-up; and the share of that second half the worker waited for its input
        (the mean of its ``input_wait_fraction`` records there, each over the same number of steps).
    """
    import mlflow
    import ray

    from pipelines.train import run

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    run(config)
    ray.shutdown()
    client = mlflow.MlflowClient(config.train.tracking_uri)
    experiment = client.get_experiment_by_name(config.train.experiment)
    (latest,) = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)

    def history(metric: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(latest.info.run_id, metric))

    rates, waits = history("samples_per_s"), history("input_wait_fraction")
    batch = config.train.global_batch_size
    # a record at step s counts (s - 1) batches since the first step's end: its time is samples / rate
    elapsed = [((s - 1) * batch, (s - 1) * batch / rate) for s, rate in rates]
    middle = len(elapsed) // 2
    (middle_samples, middle_time), (end_samples, end_time) = elapsed[middle], elapsed[-1]
    late_waits = [wait for _, wait in waits[middle + 1 :]]  # the records after the middle one
    return (
        rates[-1][1],
        (end_samples - middle_samples) / (end_time - middle_time),
        (sum(late_waits) / len(late_waits) if late_waits else float("nan")),
    )


def make_cache(folder: Path, images: int, teacher: str, device: str) -> str:
    """A teacher cache with images and local features: the synthetic world for the tiny teacher, else
    photo-like 640x480 JPEGs (``embed_throughput.make_jpegs``) embedded by ``isa embed`` at 256 px."""
    import ray

    from pipelines.embed import run

    if teacher == TINY_TEACHER:
        from isa.data.synthetic import generate_world, write_world

        write_world(generate_world(seed=0, num_images=images, num_triplets=20, image_size=64), folder / "world")
        source, cache = folder / "world" / "images", ["cache.local_grid=2", "cache.image_size=64"]
    else:
        source, cache = folder / "jpegs", ["cache.batch_size=256", f"cache.fast_decode={device == 'cuda'}"]
        make_jpegs(source, images)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    overrides = [f"teacher.name={teacher}", "teacher.pretrained=none", f"cache.device={device}", *cache]
    run(str(source), str(folder / "cache"), load_config(None, overrides))
    ray.shutdown()
    return str(folder / "cache")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", help="teacher cache (with images and teacher_local)")
    parser.add_argument("--make-cache", action="store_true", help="make a cache first (synthetic world or photo JPEGs)")
    parser.add_argument("--cache-images", "--world-images", type=int, default=2400, help="images (--make-cache)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--teacher", help=f"default: {TINY_TEACHER} on cpu, ViT-L-14 on cuda")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--plain-steps", type=int, default=0, help="steps of the plain loop (0: --steps)")
    parser.add_argument("--no-plain", action="store_true", help="leave out the plain loop")
    parser.add_argument("--step-only", type=int, default=0, help="also time this many steps on random tensors")
    parser.add_argument("--profile", type=int, default=0, help="then profile this many steps (with --step-only)")
    parser.add_argument("--rounds", type=int, default=3, help="isa train runs, each between two plain loops")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. student.backbone=efficientnet_b0")
    args = parser.parse_args()
    teacher = args.teacher or (TINY_TEACHER if args.device == "cpu" else "ViT-L-14")
    if args.device == "cpu":  # a small student on the tiny teacher: a CPU-sized step
        preset = [
            "student.backbone=mobilenetv3_large_100",
            "student.image_size=64",
            "token_learner.dim=64",
            "token_learner.heads=4",
            "train.global_batch_size=32",
        ]
    else:  # benchmarks/RESULTS.md's GPU setting: efficientnet_b0 at 224 px, M=4 (the defaults), batch 256, bf16
        preset = ["train.global_batch_size=256", "train.use_gpu=true"]
    with tempfile.TemporaryDirectory() as tmp:
        cache = make_cache(Path(tmp), args.cache_images, teacher, args.device) if args.make_cache else args.cache
        overrides = [
            f"teacher.name={teacher}",
            "teacher.pretrained=none",
            *preset,
            f"train.cache={cache}",
            f"train.output={Path(tmp) / 'run'}",
            f"train.max_steps={args.steps}",
            f"train.checkpoint_every={args.steps}",
            "train.val_fraction=0.0",
            "train.warmup_fraction=0",
            f"train.tracking_uri=sqlite:///{Path(tmp) / 'mlflow.db'}",
            *args.overrides,
        ]
        config = load_config(None, overrides)
        # each figure is printed as soon as it is measured: a run cut short keeps what it got
        grid = json.loads(Path(cache, "_isa_cache.json").read_text())["local_grid"]  # the cache's, as trained on
        ceiling = step_only(config, args.step_only, args.device, grid, args.profile) if args.step_only else None
        measured({"training step only": ceiling})
        plain_steps = args.plain_steps or args.steps
        # the plain loop before and after each isa train run, each run compared with the mean of its two
        # neighbours: a machine that speeds up or slows down during the run favours neither side
        plain = [None if args.no_plain else plain_loop(config, cache, plain_steps, args.device)]
        measured({"plain loop": plain[0]})
        ours = []
        for round_ in range(args.rounds):
            if args.device == "cuda":
                torch.cuda.empty_cache()  # the in-process loops' memory, for isa train's worker
            ours.append(isa_train(load_config(None, [*overrides, f"train.output={Path(tmp) / f'run-{round_}'}"])))
            round_figures = {f"isa train, round {round_ + 1}": ours[-1][0], "second half": ours[-1][1]}
            measured({**round_figures, "share of the second half waiting for input": ours[-1][2]})
            plain.append(None if args.no_plain else plain_loop(config, cache, plain_steps, args.device))
            measured({f"plain loop after round {round_ + 1}": plain[-1]})
    print(
        f"\n{config.student.backbone} · M={config.token_learner.num_tokens} · teacher {config.teacher.name} · "
        f"batch {config.train.global_batch_size} · {args.steps} steps ({plain_steps} plain) · "
        f"{args.device} · {os.cpu_count()} cores · {args.rounds} round(s)"
    )
    report(ceiling, plain, ours)


def report(ceiling: float | None, plain: list[float | None], ours: list[tuple[float, float, float]]) -> None:
    """The table of rates and each round's overhead against the mean of the plain loops around it."""

    def rate(value: float | None) -> str:
        return "not run" if value is None else f"{value:,.1f}"

    print("| what | samples/s |\n|---|---|")
    print(f"| training step only, random tensors on the device | {rate(ceiling)} |")
    print(f"| plain PyTorch loop, before round 1 | {rate(plain[0])} |")
    for number, ((whole, half, wait), after) in enumerate(zip(ours, plain[1:]), start=1):
        print(f"| isa train, round {number} (second half; its input wait) | {rate(whole)} ({rate(half)}; {wait:.0%}) |")
        print(f"| plain PyTorch loop, after round {number} | {rate(after)} |")
    if plain[0] is not None:
        overheads = {"whole run": [], "second half": []}
        for number, (whole, half, _) in enumerate(ours):
            around = (plain[number] + plain[number + 1]) / 2
            overheads["whole run"].append(max(0.0, 1 - whole / around))
            overheads["second half"].append(max(0.0, 1 - half / around))
        for label, values in overheads.items():
            each = " / ".join(f"{v:.0%}" for v in values)
            middle = median(values)
            print(f"isa train ({label}) overhead against the plain loops around each run: {each}; median {middle:.0%}")
    if ceiling:
        for number, (whole, half, _) in enumerate(ours, start=1):
            print(f"isa train round {number} / step only: {whole / ceiling:.0%} (second half {half / ceiling:.0%})")


if __name__ == "__main__":
    main()
