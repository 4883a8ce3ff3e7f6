"""CLI subcommands, one module per area; each defines `register(subparsers)` and an `ORDER`."""

from __future__ import annotations

import argparse
import json
from typing import Callable, TypeAlias

from ..config import config_help

# What `ArgumentParser.add_subparsers()` returns; each module's `register(sub)` adds its commands to it.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Handler: TypeAlias = Callable[[argparse.Namespace], int]

# The command words of this invocation (`protege train sft ...` -> ["train", "sft", ...]), set by `cli.main`.
# Only the stage parser on that path imports its config class (and with it torch): `protege --help` and
# `protege train --help` list commands from the registry's help lines. None (a library caller): build all.
INVOKED: list[str] | None = None


def add_config_parser(sub: Subparsers, name: str, config_cls: type, help: str, func: Handler) -> argparse.ArgumentParser:
    """A subcommand driven by a config class: `--config FILE` plus `--key=value` overrides, defaults in --help."""
    p = sub.add_parser(name, help=help, description=help, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="config keys (set in --config YAML or as --key=value):\n" + config_help(config_cls))
    p.add_argument("--config", "-c", default=None, help="YAML file with this stage's config")
    p.set_defaults(func=func, accepts_overrides=True)
    return p


def add_stage_parser(sub: Subparsers, name: str, kind: str, func: Handler | None = None, help: str | None = None) -> argparse.ArgumentParser:
    """The subcommand of a registered stage kind (`stages.STAGE_KINDS`), which gives its config class and help
    line, so the CLI cannot drift from what recipes run; `func` defaults to `run_stage`."""
    from ..stages import STAGE_KINDS, stage_kind

    help = help or STAGE_KINDS[kind].help
    path = getattr(sub, "_prog_prefix", "").split()[1:] + [name]
    if INVOKED is not None and INVOKED[:len(path)] != path:  # not this command: a light parser, no import
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func or run_stage, accepts_overrides=True)
    else:
        p = add_config_parser(sub, name, stage_kind(kind)[0], help, func or run_stage)
    p.set_defaults(stage_kind=kind)
    return p


def run_stage(args: argparse.Namespace) -> int:
    """Run `args.stage_kind` with its config from `--config` and the `--key=value` overrides; print the result."""
    from ..config import load_config
    from ..stages import stage_kind

    config_cls, run = stage_kind(args.stage_kind)
    print(json.dumps(run(load_config(config_cls, args.config, args.overrides)), indent=2, default=str))
    return 0
