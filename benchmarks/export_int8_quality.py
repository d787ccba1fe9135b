"""Composed-retrieval R@10 on the synthetic world with the exported query encoder: float32 against int8.

The checkpoint is exported (``isa export --int8``) into a temporary folder; every val and test triplet of the
synthetic world is a query: its reference image's bytes -> pseudo-words (eager torch student, onnxruntime
float32, onnxruntime int8) -> the teacher's text tower composes them with the modifier
(``prompt.query_template``) -> ranked against the teacher's embeddings of every world image, the reference left
out (as CIRR does). R@10: the share of queries whose target is among the 10 best. CPU only.

    python benchmarks/export_int8_quality.py outputs/quickstart/run            # a run folder or a checkpoint
    python benchmarks/export_int8_quality.py CHECKPOINT --images 600 --triplets 400 --seed 0
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time

import numpy as np
import torch

from isa.build import build_teacher
from isa.checkpoint_files import saved_checkpoint
from isa.config import from_dict
from isa.data.synthetic import generate_world, render_scene
from isa.query import QueryEncoder, student_views
from isa.retrieval import rank
from isa.teacher import crop_transform, normalize_crops
from pipelines import export
from pipelines.export.client import ExportedEncoder

K = 10


@torch.no_grad()
def gallery_embeddings(teacher, pictures: list, preprocess: dict, batch: int = 64) -> torch.Tensor:
    """The teacher's embeddings of PIL images through its own preprocessing (what ``isa embed`` caches): (N, D)."""
    crop = crop_transform(preprocess)
    parts = []
    for start in range(0, len(pictures), batch):
        crops = np.stack([np.asarray(crop(picture)) for picture in pictures[start : start + batch]])  # (B, S, S, 3)
        parts.append(teacher.encode_image(normalize_crops(torch.from_numpy(crops), preprocess)))
    return torch.cat(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint folder or training run folder")
    parser.add_argument("--images", type=int, default=600, help="synthetic world: base images")
    parser.add_argument("--triplets", type=int, default=400, help="synthetic world: triplets")
    parser.add_argument("--seed", type=int, default=0, help="synthetic world: seed")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    started = time.perf_counter()

    folder, saved = saved_checkpoint(args.checkpoint)
    config = from_dict(saved["config"])
    teacher = build_teacher(config.teacher)
    encoder = QueryEncoder.from_checkpoint(export.local_checkpoint(folder), teacher)
    out = tempfile.mkdtemp(prefix="isa-int8-quality-")
    export.run(export.ExportOptions(args.checkpoint, out, int8=True))
    exported = {"onnxruntime float32": ExportedEncoder.load(out), "onnxruntime int8": ExportedEncoder.load(out, True)}

    world = generate_world(seed=args.seed, num_images=args.images, num_triplets=args.triplets)
    names = list(world.images)
    position = {name: index for index, name in enumerate(names)}
    pictures = [render_scene(world.images[name], world.image_size) for name in names]
    gallery = gallery_embeddings(teacher, pictures, saved["teacher"]["preprocess"])  # (N, D)

    triplets = [t for split in ("val", "test") for t in world.triplets.get(split, [])]
    datas = {}
    for triplet in triplets:
        buffer = io.BytesIO()
        pictures[position[triplet.reference]].save(buffer, format="PNG")
        datas[triplet.reference] = buffer.getvalue()
    references = torch.tensor([position[t.reference] for t in triplets])
    targets = torch.tensor([position[t.target] for t in triplets])

    def recall(words_of) -> float:
        hits = 0
        for start in range(0, len(triplets), args.batch):
            batch = triplets[start : start + args.batch]
            sentence = torch.from_numpy(words_of([datas[t.reference] for t in batch]))  # (B, M, w)
            queries = encoder.compose(sentence, [(t.modifier,) for t in batch])  # (B, D)
            exclude = references[start : start + len(batch)]
            top = rank(queries, gallery, K, exclude=exclude)
            hits += int((top == targets[start : start + len(batch), None]).any(dim=1).sum())
        return hits / len(triplets)

    rows = {"torch eager float32": recall(lambda d: encoder.sentences(student_views(d, config)).sentence.numpy())}
    rows.update({name: recall(model.pseudo_words) for name, model in exported.items()})
    manifest = exported["onnxruntime int8"].manifest
    print(
        f"checkpoint {manifest['checkpoint']['uri']} (step {manifest['checkpoint']['step']}), "
        f"{config.student.backbone} + {config.student.mapper}"
    )
    print(f"synthetic world seed {args.seed}: {len(names)} gallery images, {len(triplets)} val+test queries\n")
    print("| query encoder | CIR R@10 |\n|---|---:|")
    for name, value in rows.items():
        print(f"| {name} | {100 * value:.2f} |")
    parity = manifest["int8_parity"]
    print(
        f"\nint8 vs float32 pseudo-words (export-time check): cosine min {parity['pseudo_words_cosine_min']:.4f}, "
        f"mean {parity['pseudo_words_cosine_mean']:.4f}"
    )
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
