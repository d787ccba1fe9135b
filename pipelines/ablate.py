"""``isa ablate``: an ablation suite (METHOD.md §6): train each row, evaluate it, write the table, CSV and plot.

suite (tune/suites/NAME.yaml or a path) + base config -> checks -> every row through the train stage (Ray Tune
grid, resumable) -> ``isa eval`` per row (image-only retrieval; the CIR benchmark when configured) + query-side
cost -> ``ablation_NAME.md``, ``.csv``, ``.png`` in the suite folder and on the MLflow parent run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from isa.config import ConfigError
from pipelines.common import config_parser, init_ray


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_parser("isa ablate", "Run an ablation suite: train, evaluate and tabulate every row.")
    parser.add_argument("--suite", required=True, help="a suite in tune/suites (tokens, losses, ...) or a YAML path")
    args = parser.parse_intermixed_args(argv)
    from isa.cache import CacheError
    from isa.checkpoint import CheckpointError
    from isa.data.benchmarks import BenchmarkFormatError
    from pipelines.eval_gallery import EvalError
    from pipelines.train import TrainError
    from tune import ablation
    from tune.space import SweepError

    try:
        suite, config = ablation.load(args.suite, args.config, args.overrides)
        init_ray()
        result = ablation.run(suite, config)
    except (ConfigError, SweepError, TrainError, BenchmarkFormatError, CacheError, CheckpointError, EvalError) as error:
        print(f"isa ablate: {error}", file=sys.stderr)
        return 2
    print((result.files and _read(result.files[f"ablation_{suite.name}.md"])) or "")
    for name, uri in result.files.items():
        print(f"{name}: {uri}")
    print(f"MLflow: {result.outcome.plan.tracking_uri} · parent run {result.outcome.plan.parent_run_id}")
    return 0


def _read(uri: str) -> str:
    from isa.cache import filesystem

    fs, path = filesystem(uri)
    return fs.cat_file(path).decode()
