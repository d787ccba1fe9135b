"""``isa config``: validate a config file and overrides, print the resolved config as YAML."""

from __future__ import annotations

from collections.abc import Sequence

import yaml

from isa.config import to_dict
from pipelines.common import config_parser, resolve_config


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_parser("isa config", "Validate a config and print it resolved (defaults filled in).")
    args = parser.parse_intermixed_args(argv)
    config = resolve_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return 0
