"""``isa tune``: a Ray Tune sweep over the train stage (ASHA on the validation metric, MLflow parent + trial runs).

sweep YAML (config sections + ``tune:`` + ``space:``) -> checks (keys, values, metric, searcher, cache, cluster)
-> ``Tuner`` over ``pipelines.train.run`` (one Ray Train run per trial) -> trial table, best trial in MLflow.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from isa.config import ConfigError
from pipelines.common import config_parser, init_ray


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_parser(
        "isa tune",
        "Sweep hyperparameters of isa train with Ray Tune (ASHA, MLflow). --config takes a sweep file: any config "
        "sections, tune: (metric, mode, search, scheduler, ...) and space: (dotted key: {grid|choice|uniform|"
        "loguniform|randint: [...]}).",
    )
    parser.add_argument("--resume", metavar="DIR", help="continue the interrupted sweep in DIR (finished trials stay)")
    args = parser.parse_intermixed_args(argv)
    if args.resume and (args.config or args.overrides):
        print("isa tune: --resume continues a sweep with its own settings; drop --config/overrides", file=sys.stderr)
        return 2
    from pipelines.train import TrainError
    from tune.sweep import SweepError, load_sweep_file, resume, run_sweep, summary

    try:
        if args.resume:
            init_ray()
            outcome = resume(args.resume)
        else:
            config, space = load_sweep_file(args.config, args.overrides)
            init_ray()
            outcome = run_sweep(config, space)
    except (ConfigError, SweepError, TrainError) as error:
        print(f"isa tune: {error}", file=sys.stderr)
        return 2
    print(summary(outcome))
    if outcome.best is not None:
        print(f"best trial: {outcome.best.trial_id} · {outcome.best.overrides} · config in MLflow best_config.json")
    print(f"sweep folder: {outcome.plan.folder} (isa tune --resume {outcome.plan.folder} continues it)")
    print(f"MLflow: {outcome.plan.tracking_uri} · parent run {outcome.plan.parent_run_id}")
    return 0
