"""`protege generate self-instruct|distill|orca|self-chat --config X.yaml [--key=value ...]`."""

from __future__ import annotations

import argparse
import json

from . import Subparsers, add_stage_parser

ORDER = 20


def register(sub: Subparsers) -> None:
    from ..stages import kinds_under

    p = sub.add_parser("generate", help="make imitation data with a teacher (self-instruct, distill, orca, self-chat) or preference pairs",
                       description="Make imitation data with a teacher. Each writes OUT_DIR/records.jsonl + manifest.json; "
                                   "rerunning a killed run resumes from the teacher cache.")
    gsub = p.add_subparsers(dest="generator", metavar="KIND", required=True)
    for name, kind in kinds_under("generate").items():
        add_stage_parser(gsub, name, f"generate.{name}", _run)


def _run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..stages import stage_kind

    config_cls, run = stage_kind(args.stage_kind)
    cfg = load_config(config_cls, args.config, args.overrides)
    counts = run(cfg)
    print(json.dumps(counts, indent=2))
    print(f"wrote {counts.get('records', 0)} records to {cfg.out_dir}/records.jsonl")
    return 0
