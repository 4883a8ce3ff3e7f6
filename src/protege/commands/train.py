"""`protege train METHOD --config X.yaml [--key=value ...]`: one subcommand per `train.*` stage kind."""

from __future__ import annotations

import argparse
import json

from . import Subparsers, add_stage_parser

ORDER = 40


def register(sub: Subparsers) -> None:
    from ..stages import kinds_under

    methods = kinds_under("train")
    p = sub.add_parser("train", help=f"train a model: {', '.join(methods)}",
                       description="Train a model with one method; each takes --config FILE and --key=value overrides.")
    msub = p.add_subparsers(dest="method", metavar="METHOD", title="methods")
    for name, kind in methods.items():
        mp = add_stage_parser(msub, name, f"train.{name}", _run_method)
        mp.add_argument("--resume", nargs="?", const="yes", choices=["auto", "yes", "no"], default=None,
                        help="`--resume` (= yes): require a checkpoint in out_dir and continue from it; `--resume=no`: "
                             "start over; default auto: resume when a checkpoint exists and the config is unchanged")
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _run_method(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..stages import stage_kind

    config_cls, run = stage_kind(args.stage_kind)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"--resume={args.resume}")
    summary = run(load_config(config_cls, args.config, overrides))
    print(json.dumps(summary, indent=2))
    return 0
