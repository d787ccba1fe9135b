"""``isa quickstart [OUTPUT]``: the whole pipeline on the synthetic world, offline, on a laptop.

world -> a tiny teacher aligned on the world (trained here with open_clip's own loss) -> ``isa embed`` of
the world's training images -> ``isa train`` of the ISA student and of the symmetric variant -> ``isa
eval`` on the world's CIRR-format val split (with the teacher-only baselines) and image-only retrieval on
held-out images -> the deployment: ``isa index`` of the val gallery and ``isa export`` of the ISA student ->
one table in ``OUTPUT/quickstart.json`` and ``.md``, and the ``isa serve`` command that serves them. Every step
runs the real stage code on a local Ray instance, local storage and an embedded MLflow (SQLite in OUTPUT).

This process imports torch only for the evaluation, after training: the teacher trains in a process of
its own, and embed and train keep torch in Ray's workers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from isa.config import Config, ConfigError, from_dict, load_config, parse_overrides
from isa.data.synthetic import WORLD_TEACHER, WORLD_TEACHER_FOLDER, WORLD_TEACHER_STEPS, generate_world, write_world
from pipelines import embed, train
from pipelines.stage import init_ray, stage_parser
from pipelines.tracking import ui_command

ISA_ROW, SYMMETRIC_ROW = "ISA student (asymmetric)", "symmetric variant"
STEPS = 8  # progress lines


SETTINGS = Path(__file__).with_name("quickstart.yaml")  # the default --config, shipped with the package


def settings(output: Path, teacher_file: Path, train_steps: int) -> list[str]:
    """What depends on OUTPUT and the options, as overrides on the settings file (user overrides follow)."""
    tracking = f"sqlite:///{output.resolve() / 'mlflow.db'}"
    return [
        f"teacher.pretrained={teacher_file}",
        f"train.max_steps={train_steps}",
        f"train.checkpoint_every={train_steps}",
        f"train.tracking_uri={tracking}",
        f"eval.dataset_root={output / 'world' / 'cirr'}",
        f"eval.tracking_uri={tracking}",
    ]


class Progress:
    """``[k/7] what ... (elapsed)`` lines; ``stages`` (what, seconds from the start) for the document."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.stages: list[tuple[str, float]] = []

    def __call__(self, what: str) -> None:
        elapsed = time.monotonic() - self.started
        self.stages.append((what, round(elapsed, 1)))
        print(f"[{len(self.stages)}/{STEPS}] {what} ({elapsed:.0f} s)", flush=True)


def make_world(output: Path, images: int, triplets: int, seed: int) -> Path:
    """The world (skipped when OUTPUT/world is complete)."""
    root = output / "world"
    if not (root / "world.json").exists():
        write_world(generate_world(seed=seed, num_images=images, num_triplets=triplets, image_size=64), root)
    return root


def teacher_file(output: Path) -> Path:
    """Where the quickstart keeps the world teacher's weights."""
    return output / WORLD_TEACHER_FOLDER / f"{WORLD_TEACHER}.safetensors"


def check(output: Path, args: argparse.Namespace, overrides: Sequence[str]) -> Config:
    """The quickstart's config, checked before any work: the settings file, the overrides, the teacher.

    Raises:
        ConfigError: naming the key (or the teacher, which the quickstart trains itself).
    """
    config = load_config(args.config, [*settings(output, teacher_file(output), args.train_steps), *overrides])
    if config.teacher.name != WORLD_TEACHER:
        raise ConfigError(f"the quickstart trains its own teacher: keep teacher.name={WORLD_TEACHER} in {args.config}")
    return config


def make_teacher(output: Path, world: Path, steps: int, seed: int) -> Path:
    """Train the world teacher on the training split's images (skipped when its file exists).

    The training runs in a process of its own, so its memory goes back to the system before Ray starts.
    """
    path = teacher_file(output)
    if not path.exists():
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pool.submit(train_teacher, world, path, steps, seed).result()
    return path


def train_teacher(world: Path, path: Path, steps: int, seed: int) -> Path:
    """The world teacher trained contrastively on the training split's images and their descriptions."""
    from isa.data.world_teacher import save_world_teacher, train_world_teacher

    manifest = json.loads((world / "world.json").read_text())
    names = manifest["splits"]["train"]
    attributes = [
        {k: manifest["images"][n][k] for k in ("shape", "colour", "size", "position", "background", "texture")}
        for n in names
    ]
    model = train_world_teacher([world / "images" / f"{n}.png" for n in names], attributes, steps=steps, seed=seed)
    return save_world_teacher(model, path)


def train_student(config: Config, output: Path, name: str, *overrides: str) -> Path:
    """One training run under OUTPUT/runs/NAME; its latest checkpoint. A rerun of the quickstart continues the run
    there (a finished one is left as it is), or refuses when its settings differ."""
    run_dir = output / "runs" / name
    result = train.run(with_overrides(config, f"train.output={run_dir}", *overrides), start="continue")
    return Path(result.checkpoint.path) / "isa"


def with_overrides(config: Config, *overrides: str) -> Config:
    return from_dict(parse_overrides(overrides), base=config)


def table(cir: dict, images: dict) -> dict[str, dict[str, float | None]]:
    """The quickstart rows: CIR R@K on the val split, image-only R@1 and the query image path's CPU latency."""
    from pipelines.eval.outputs import IMAGE_ONLY, IMAGE_TEXT, TEXT_ONLY  # the eval package: torch, imported by now

    teacher_ms, isa_ms, symmetric_ms = (c["latency_ms"] for c in cir["cost"])
    isa_name, symmetric_name = list(cir["rows"])[:2]  # the checkpoints' rows come first, in order
    sources = {
        ISA_ROW: (isa_name, isa_ms),
        SYMMETRIC_ROW: (symmetric_name, symmetric_ms),
        TEXT_ONLY: (TEXT_ONLY, None),
        IMAGE_ONLY: (IMAGE_ONLY, teacher_ms),
        IMAGE_TEXT: (IMAGE_TEXT, teacher_ms),
    }
    rows: dict[str, dict[str, float | None]] = {}
    for row, (source, latency) in sources.items():
        rows[row] = {f"CIR R@{k}": cir["rows"][source][f"R@{k}"] for k in (1, 5, 10, 50)}
        rows[row]["image-only R@1"] = images["rows"].get(source, {}).get("R@1")
        rows[row]["query image ms"] = latency
    return rows


def markdown(rows: dict, teacher_ms: float) -> str:
    columns = list(next(iter(rows.values())))
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, values in rows.items():
        cells = ["–" if v is None else f"{v:.1f}" if "ms" not in c else f"{v:.2f}" for c, v in values.items()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"CIR: the world's CIRR-format val split (reference removed). Image-only R@1: held-out images, "
        f"`a photo of {{S}}` against the teacher's gallery. Query image ms: batch 1 on the CPU (the teacher "
        f"image tower: {teacher_ms:.2f} ms)."
    )
    return "\n".join(lines) + "\n"


def run(output: Path, args: argparse.Namespace, overrides: Sequence[str]) -> dict:
    """Every stage in turn; returns the quickstart document (also written as JSON and Markdown)."""
    config = check(output, args, overrides)
    progress = Progress()
    progress("synthetic world")
    world = make_world(output, args.images, args.triplets, args.seed)
    progress(f"world teacher ({args.teacher_steps} contrastive steps with open_clip's ClipLoss)")
    make_teacher(output, world, args.teacher_steps, args.seed)
    init_ray(dashboard=False, single_machine=True)  # a local instance for a small machine: a smaller footprint
    progress("isa embed: teacher cache of the training images")
    cache = output / "cache"
    summary = embed.run(str(world / "cirr" / "train"), str(cache), config)
    print(f"  {summary.line()}", flush=True)
    config = with_overrides(config, f"train.cache={cache}")
    progress(f"isa train: ISA student ({args.train_steps} steps)")
    isa_checkpoint = train_student(config, output, "isa")
    progress(f"isa train: symmetric variant ({args.train_steps} steps)")
    symmetric_checkpoint = train_student(config, output, "symmetric", "student.backbone=symmetric")
    checkpoints = f"eval.checkpoints={isa_checkpoint},{symmetric_checkpoint}"
    from pipelines import eval as evaluate  # torch in this process from here on

    progress("isa eval: CIRR-format val split, with the teacher-only baselines")
    cir = evaluate.run(with_overrides(config, checkpoints, f"eval.output={output / 'eval' / 'cirr'}"))
    progress("isa eval: image-only retrieval on held-out images")
    images = evaluate.run(
        with_overrides(
            config,
            checkpoints,
            "eval.benchmark=images",
            f"eval.dataset_root={cache}",
            "eval.latency_runs=0",
            f"eval.output={output / 'eval' / 'images'}",
        )
    )
    progress("deployment: isa index of the val gallery, isa export of the ISA student")
    index, exported = deploy(output, cir["gallery_cache"], isa_checkpoint)
    rows = table(cir, images)
    document = {
        "rows": rows,
        "teacher_image_tower_ms": cir["cost"][0]["latency_ms"],
        "gallery_size": cir["gallery_size"],
        "queries": cir["queries"],
        "report": str(output / "eval" / "cirr" / "report.html"),
        "checkpoints": {ISA_ROW: str(isa_checkpoint), SYMMETRIC_ROW: str(symmetric_checkpoint)},
        "index": index,
        "export": exported,
        "serve": serve_command(output / "runs" / "isa", index),
        "mlflow": config.train.tracking_uri,
        "seconds": round(time.monotonic() - progress.started, 1),
        "stages": [{"stage": what, "started_s": at} for what, at in progress.stages],
    }
    (output / "quickstart.json").write_text(json.dumps(document, indent=2))
    (output / "quickstart.md").write_text(markdown(rows, document["teacher_image_tower_ms"]))
    return document


def deploy(output: Path, gallery_cache: str, checkpoint: Path) -> tuple[str, str]:
    """The asymmetric split of what was just trained: an exact index of the gallery the evaluation embedded, and
    the ISA student's query path as ONNX (with int8). Returns the index and export folders."""
    from pipelines import export, index

    folders = str(output / "index"), str(output / "export")
    index.run(gallery_cache, folders[0], index.Options(overwrite=True))
    export.run(export.ExportOptions(str(checkpoint), folders[1], int8=True, overwrite=True))
    return folders


def serve_command(run_dir: Path, index: str) -> str:
    """The one command that serves the quickstart's student over its index."""
    return f"isa serve --checkpoint {run_dir} --index {index}"


def parser() -> argparse.ArgumentParser:
    """``isa quickstart``'s arguments."""
    parser = stage_parser("isa quickstart", __doc__.split("\n")[0])
    output = "isa-output/quickstart"  # stated in the help: parse_intermixed_args hides a positional's default
    parser.add_argument("output", nargs="?", default=output, help=f"folder for everything (default: {output})")
    parser.add_argument(
        "--config", default=str(SETTINGS), help="settings file (default: the shipped quickstart.yaml; copy it to edit)"
    )
    parser.add_argument("--images", type=int, default=2500, help="random base scenes of the world")
    parser.add_argument("--triplets", type=int, default=800, help="composed-retrieval triplets of the world")
    steps = WORLD_TEACHER_STEPS
    parser.add_argument("--teacher-steps", type=int, default=steps, help="contrastive steps of the world teacher")
    parser.add_argument("--train-steps", type=int, default=300, help="distillation steps per student")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and of its teacher")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    args = parser().parse_intermixed_args(argv)
    return args, args.overrides


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    output = Path(args.output)
    document = run(output, args, overrides)
    print()
    print((output / "quickstart.md").read_text())
    print(f"done in {document['seconds']:.0f} s")
    print(f"report:      {document['report']}")
    print(f"checkpoints: {', '.join(document['checkpoints'].values())}")
    print(f"MLflow UI:   {ui_command(document['mlflow'])}")
    print(f"ONNX query encoder: {document['export']}")
    print(f"serve it:    {document['serve']}")
    return 0
