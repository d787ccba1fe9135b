"""CPU seconds to export a student's query path to ONNX: ``isa export``'s conversion against a plain
``torch.onnx.export`` of the same module with the same settings, interleaved in one process.

Plain: the maintained exporter (``dynamo=True``) on the query path as built, dynamic batch, the same opset and
graph optimization. Ours: :func:`pipelines.export.convert.to_onnx`. Each round exports every backbone both
ways; one export of each goes first, untimed (the exporter's own first-call set-up). Random weights, the
ATL mapper (M=4), ``--size`` input. Both models are checked against eager torch at batch 3, so a fast export
that changed the outputs would not pass unnoticed.

    python benchmarks/export_time.py                                      # every backbone, 3 rounds
    python benchmarks/export_time.py --backbones mobilenetv2_100 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import torch

from isa.students import BACKBONES, create_student
from pipelines.export import DEFAULT_OPSET, convert


def plain_export(path: convert.QueryPath, size: int, opset: int) -> bytes:
    """``torch.onnx.export`` of ``path`` as it is, with :func:`convert.to_onnx`'s settings."""
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with convert._quiet():
        program = torch.onnx.export(
            path.eval(),
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[convert.INPUT],
            output_names=path.output_names,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            optimize=True,
            verbose=False,
        )
    return program.model_proto.SerializeToString()


def max_abs_diff(model: bytes, path: convert.QueryPath, images: torch.Tensor) -> float:
    """The largest difference of onnxruntime's outputs from eager torch's on ``images`` (B, 3, S, S)."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    found = session.run(None, {convert.INPUT: images.numpy()})
    with torch.no_grad():
        expected = path(images)
    return max(float(np.abs(f - e.numpy()).max()) for f, e in zip(found, expected))


def cpu_seconds(export: Callable[[convert.QueryPath], bytes], path: convert.QueryPath) -> tuple[float, bytes]:
    """This process's CPU seconds for ``export(path)``, and the model."""
    start = time.process_time()
    model = export(path)
    return time.process_time() - start, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--backbones", default=",".join(BACKBONES), help="comma-separated backbones")
    parser.add_argument("--size", type=int, default=64, help="input side (the graph, not the pixels, costs)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = torch.rand(3, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    paths: dict[str, convert.QueryPath] = {}
    for name in args.backbones.split(","):
        torch.manual_seed(0)
        student = create_student(name, word_dim=32, embed_scale=0.5, num_tokens=4, token_dim=64, heads=4).eval()
        paths[name] = convert.QueryPath(student, attention=True).eval()
        with torch.no_grad():
            paths[name](images[:2])  # eval-time caches filled, as to_onnx does before tracing
    ways = {
        "plain torch.onnx.export": lambda p: plain_export(p, args.size, args.opset),
        "isa export (to_onnx)": lambda p: convert.to_onnx(p, args.size, args.opset),
    }
    first = next(iter(paths.values()))
    for export in ways.values():
        export(first)  # untimed: the exporter's first-call set-up
    seconds: dict[tuple[str, str], list[float]] = {(n, w): [] for n in paths for w in ways}
    diffs: dict[tuple[str, str], float] = {}
    for round_ in range(args.rounds):
        for name, path in paths.items():
            order = list(ways.items()) if round_ % 2 == 0 else list(reversed(ways.items()))
            for way, export in order:
                spent, model = cpu_seconds(export, path)
                seconds[name, way].append(spent)
                diffs[name, way] = max(diffs.get((name, way), 0.0), max_abs_diff(model, path, images))
                print(f"round {round_ + 1} {name} {way}: {spent:.1f} CPU s", flush=True)
    plain, ours = ways
    print(f"\nCPU s per export, median of {args.rounds} interleaved rounds; input {args.size}x{args.size}\n")
    print(f"| backbone | {plain} | {ours} | ratio | max abs diff plain / ours |")
    print("|---|---:|---:|---:|---:|")
    for name in paths:
        a, b = statistics.median(seconds[name, plain]), statistics.median(seconds[name, ours])
        print(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f} | {diffs[name, plain]:.1e} / {diffs[name, ours]:.1e} |")


if __name__ == "__main__":
    main()
