"""`protege curate IN... --out DIR [--config X.yaml] [--key=value ...]`."""

from __future__ import annotations

import argparse
from typing import Any

from . import Subparsers, add_stage_parser

ORDER = 30


def register(sub: Subparsers) -> None:

    p = add_stage_parser(sub, "curate", "curate", _curate,
                         help="clean, split, deduplicate, language/quality-filter, decontaminate, mix and tag record "
                         "files; writes records.jsonl, removed.jsonl and a data card (card.md, card.html)")
    p.epilog = _help_epilog()
    p.add_argument("inputs", nargs="*", help="record files (override `inputs` of the config)")
    p.add_argument("--out", "--out_dir", "-o", dest="out", default=None, help="output folder (the config's `out_dir`)")


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _help_epilog() -> str:
    """Top-level keys, then every step kind with its options (the default step list is too long to print)."""
    from typing import get_args

    from ..curate.config import CurateConfig, Step

    lines = ["config keys (set in --config YAML or as --key=value):"]
    for name, field in CurateConfig.model_fields.items():
        default = "clean, dedup, language, quality" if name == "steps" else _short(field.get_default(call_default_factory=True))
        lines.append(f"  {name} (default {default}): {field.description}")
    lines.append("\nsteps: a list; each item `step: KIND` plus that kind's options:")
    for cls in get_args(get_args(Step)[0]):
        lines.append(f"  {cls.model_fields['step'].default}:")
        for name, field in cls.model_fields.items():
            if name != "step":
                lines.append(f"    {name} (default {_short(field.get_default(call_default_factory=True))}): {field.description}")
    return "\n".join(lines)


def _curate(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..stages import stage_kind

    CurateConfig, run = stage_kind("curate")

    overrides = list(args.overrides)
    cfg = load_config(CurateConfig, args.config, overrides)
    if args.inputs:
        cfg.inputs = list(args.inputs)
    if args.out:
        cfg.out_dir = args.out
    summary = run(cfg)
    print(f"{summary['in']} records in, {summary['out']} out, {summary['removed']} removed "
          f"(+{summary['added']} created) -> {cfg.out_dir}/records.jsonl; see {cfg.out_dir}/card.html")
    for s in summary["steps"]:
        print(f"  {s['step']:<14} {s['in']:>8} in {s['removed']:>8} removed {s['out']:>8} out")
    return 0
