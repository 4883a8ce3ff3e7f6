"""CLI subcommands, one module per area; each defines `register(subparsers)` and an `ORDER`."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import config_help


def add_stage_parser(sub: Any, name: str, config_cls: type, help: str, func: Any, **kw: Any) -> argparse.ArgumentParser:
    """A subcommand driven by a stage config: `--config FILE` plus `--key=value` overrides, defaults in --help."""
    p = sub.add_parser(name, help=help, description=help, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="config keys (set in --config YAML or as --key=value):\n" + config_help(config_cls), **kw)
    p.add_argument("--config", "-c", default=None, help="YAML file with this stage's config")
    p.set_defaults(func=func, accepts_overrides=True)
    return p
