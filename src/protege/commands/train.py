"""`protege train METHOD --config X.yaml [--key=value ...]`: one subcommand per training method.

Adding a method (rm, dpo, ...) is one entry in `_METHODS`: its module (which defines the
config class and `run(config) -> dict`), the config class name, and a help line.
"""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

from . import add_stage_parser

ORDER = 40

# method -> (module, config class, help)
_METHODS: dict[str, tuple[str, str, str]] = {
    "sft": ("protege.train.sft", "SFTConfig",
            "supervised fine-tuning on conversations (loss on assistant turns; LoRA or full)"),
}


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train a model: sft (more methods to come)",
                       description="Train a model with one method; each takes --config FILE and --key=value overrides.")
    methods = p.add_subparsers(dest="method", metavar="METHOD", title="methods")
    for name, (module, cls_name, help_text) in _METHODS.items():
        cls = getattr(importlib.import_module(module), cls_name)
        mp = add_stage_parser(methods, name, cls, help_text, _run_method)
        mp.add_argument("--resume", action="store_true",
                        help="require a checkpoint in out_dir and continue from it (default: resume automatically "
                             "when one exists and the config is unchanged)")
        mp.set_defaults(train_method=name)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _run_method(args: argparse.Namespace) -> int:
    from ..config import load_config

    module, cls_name, _ = _METHODS[args.train_method]
    mod = importlib.import_module(module)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("--resume=yes")
    config = load_config(getattr(mod, cls_name), args.config, overrides)
    summary = mod.run(config)
    print(json.dumps(summary, indent=2))
    return 0
