"""Argument handling shared by the stages: ``--config FILE`` plus dotted ``key=value`` overrides."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from isa.config import Config, ConfigError, load_config


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with ``--config`` and trailing ``section.key=value`` overrides."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML file with any subset of the config sections")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.lr=1e-4")
    return parser


def resolve_config(path: str | None, overrides: Sequence[str]) -> Config:
    """The resolved config, or exit with status 2 and the error naming the key."""
    try:
        return load_config(path, overrides)
    except ConfigError as error:
        print(f"isa: {error}", file=sys.stderr)
        raise SystemExit(2) from None
