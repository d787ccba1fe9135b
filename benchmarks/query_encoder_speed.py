"""Milliseconds per query image on the CPU: the exported query encoder (onnxruntime) against eager torch, and the
teacher image towers a symmetric query side would run, all timed interleaved in one run.

Batch 1, ``--threads`` CPU threads (torch.set_num_threads; onnxruntime intra-op threads, not spinning between
runs so that they leave the cores to the torch paths), random weights. Paths:
for each backbone of ``isa.students.BACKBONES`` (ATL mapper, M=4, 224x224 input, word width 768 as ViT-L-14's)
the eager torch student and its ONNX export in onnxruntime float32; the efficientnet_b0 export quantized to int8
(``isa export --int8``'s quantization, synthetic-world calibration); open_clip's ViT-L-14 and ViT-B-32 image towers
(eager torch, 224x224). Every round times each path once (:func:`isa.cost.interleaved_latency_ms`); medians.

    python benchmarks/query_encoder_speed.py                    # every backbone, 15 rounds, 2 threads
    python benchmarks/query_encoder_speed.py --runs 30 --backbones efficientnet_b0
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import open_clip
import torch

from isa.cost import interleaved_latency_ms, torch_threads
from isa.students import BACKBONES, create_student
from pipelines.export import DEFAULT_OPSET, convert

SIZE = 224
WORD_DIM = 768  # ViT-L-14's token width
TOWERS = ("ViT-L-14", "ViT-B-32")


def calibration_images(count: int) -> np.ndarray:
    """Synthetic-world scenes as (count, 3, SIZE, SIZE) float32 in [0, 1]."""
    from isa.data.synthetic import generate_world, render_scene

    world = generate_world(seed=2, num_images=max(30, count), num_triplets=0, image_size=SIZE)
    scenes = list(world.images.values())[:count]
    return np.stack([np.asarray(render_scene(s, SIZE)) for s in scenes]).astype(np.float32).transpose(0, 3, 1, 2) / 255


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads and onnxruntime intra-op threads")
    parser.add_argument("--backbones", default=",".join(BACKBONES), help="comma-separated backbones")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    array = image.numpy()
    names: list[str] = []
    calls = []
    for name in args.backbones.split(","):
        torch.manual_seed(0)
        student = create_student(name, word_dim=WORD_DIM, embed_scale=0.5, mapper="atl", num_tokens=4).eval()
        start = time.perf_counter()
        model = convert.to_onnx(convert.QueryPath(student, attention=True), SIZE, args.opset)
        print(f"exported {name} in {time.perf_counter() - start:.0f} s ({len(model) / 1e6:.1f} MB)", flush=True)
        session = convert.session(model, threads=args.threads, spin=False)
        names += [f"{name} torch eager", f"{name} onnxruntime float32"]
        calls += [lambda s=student: s(image), lambda s=session: s.run(None, {convert.INPUT: array})]
        if name == "efficientnet_b0":
            int8 = convert.quantize_int8(model, calibration_images(32))
            print(f"quantized {name} to int8 ({len(int8) / 1e6:.1f} MB)", flush=True)
            names.append(f"{name} onnxruntime int8")
            quantized = convert.session(int8, threads=args.threads, spin=False)
            calls.append(lambda s=quantized: s.run(None, {convert.INPUT: array}))
    for tower in TOWERS:
        visual = open_clip.create_model(tower, pretrained=None).visual.eval()
        names.append(f"{tower} image tower torch eager")
        calls.append(lambda v=visual: v(image))
    with torch_threads(args.threads):
        timings = interleaved_latency_ms(calls, args.runs)
    median = dict(zip(names, (m for _, m in timings)))
    width = max(len(n) for n in names)
    print(f"\nbatch 1, {SIZE}x{SIZE}, {args.threads} threads, {args.runs} interleaved rounds\n")
    print(f"| {'path':<{width}} | median ms | min ms |")
    print(f"|{'-' * (width + 2)}|----------:|-------:|")
    for name, (fastest, med) in zip(names, timings):
        print(f"| {name:<{width}} | {med:9.1f} | {fastest:6.1f} |")
    print("\nonnxruntime float32 vs torch eager (speed-up):")
    for name in args.backbones.split(","):
        print(f"  {name:<24} {median[f'{name} torch eager'] / median[f'{name} onnxruntime float32']:5.2f}x")
    if "efficientnet_b0 onnxruntime float32" in median:
        b0 = median["efficientnet_b0 onnxruntime float32"]
        int8 = median["efficientnet_b0 onnxruntime int8"]
        print(f"efficientnet_b0 int8 vs float32 (onnxruntime): {b0 / int8:.2f}x")
        for tower in TOWERS:
            tower_ms = median[f"{tower} image tower torch eager"]
            print(f"{tower} tower / efficientnet_b0 export: float32 {tower_ms / b0:.0f}x, int8 {tower_ms / int8:.0f}x")


if __name__ == "__main__":
    main()
