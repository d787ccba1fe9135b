"""``isa config``: validate a config file and overrides, print the resolved config as YAML."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import yaml

from isa.config import load_config, to_dict
from pipelines.stage import config_parser


def parser() -> argparse.ArgumentParser:
    """``isa config``'s arguments."""
    return config_parser("isa config", "Validate a config and print it resolved (defaults filled in).")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    config = load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return 0
