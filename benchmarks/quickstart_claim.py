"""Run the full-size ``isa quickstart`` and check its claim: on the synthetic world the ISA student beats the
text-only and image-only baselines in CIR R@10. Prints the table, the wall time, and exits 1 if the claim fails.

    python benchmarks/quickstart_claim.py [OUTPUT]

(Too long for the test suite; the README records its figures.)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pipelines import quickstart


def main() -> int:
    output = Path(sys.argv[1] if len(sys.argv) > 1 else "isa-output/quickstart-claim")
    started = time.monotonic()
    quickstart.main([str(output)])
    rows = json.loads((output / "quickstart.json").read_text())["rows"]
    isa = rows[quickstart.ISA_ROW]["CIR R@10"]
    text, image = rows["text only (teacher)"]["CIR R@10"], rows["image only (teacher)"]["CIR R@10"]
    holds = isa > text and isa > image
    print(f"wall time {time.monotonic() - started:.0f} s")
    verdict = "holds" if holds else "FAILS"
    print(f"CIR R@10: ISA {isa:.1f} vs text only {text:.1f} and image only {image:.1f}: the claim {verdict}")
    return 0 if holds else 1


if __name__ == "__main__":
    sys.exit(main())
