"""Run the full-size ``isa quickstart`` and check its claims: on the synthetic world the ISA student beats the
text-only and image-only baselines in CIR R@10, within 10 minutes and 4 GB. Prints the table, the wall time, the
peak memory of every process the run starts (PSS summed over the process tree, sampled every 2 s; per stage,
and the largest processes at the peak), writes the same to OUTPUT/quickstart_claim.md, and exits 1 if a claim
fails.

    python benchmarks/quickstart_claim.py [OUTPUT [QUICKSTART ARGS...]]

(Too long for the test suite; the README records its figures.)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from peak_memory import PeakMemory

from pipelines import quickstart

GB = 1e9


def main() -> int:
    output = Path(sys.argv[1] if len(sys.argv) > 1 else "isa-output/quickstart-claim")
    started = time.monotonic()
    with PeakMemory(interval=2.0) as memory:  # each sample costs ~0.2 s of CPU
        quickstart.main([str(output), *sys.argv[2:]])
    seconds = time.monotonic() - started
    document = json.loads((output / "quickstart.json").read_text())
    rows = document["rows"]
    isa = rows[quickstart.ISA_ROW]["CIR R@10"]
    text, image = rows["text only (teacher)"]["CIR R@10"], rows["image only (teacher)"]["CIR R@10"]
    holds = isa > text and isa > image
    lines = ["| stage | from s | peak memory GB |", "|---|---:|---:|"]
    stages = document["stages"]
    starts = [stage["started_s"] for stage in stages]
    windows = list(zip(starts, [*starts[1:], seconds]))
    for stage, (start, end) in zip(stages, windows):
        lines.append(f"| {stage['stage']} | {start:.0f} | {memory.peak_between(start, end)[0] / GB:.2f} |")
    lines += ["", memory.report(top=30), ""]
    for stage, (start, end) in zip(stages, windows):  # where each stage's memory goes
        lines += [f"{stage['stage']}:", memory.report(top=8, start=start, end=end), ""]
    lines.append(f"wall time {seconds:.0f} s (budget 600 s); peak memory {memory.peak / GB:.2f} GB (budget 4 GB)")
    verdict = "holds" if holds else "FAILS"
    lines.append(f"CIR R@10: ISA {isa:.1f} vs text only {text:.1f} and image only {image:.1f}: the claim {verdict}")
    (output / "quickstart_claim.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines), flush=True)
    return 0 if holds and seconds <= 600 and memory.peak <= 4e9 else 1


if __name__ == "__main__":
    sys.exit(main())
