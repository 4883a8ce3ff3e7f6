"""`protege generate self-instruct|distill|orca|self-chat --config X.yaml [--key=value ...]`."""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

from . import add_stage_parser

ORDER = 20

_HELP = {
    "self-instruct": "Self-Instruct (Alpaca): bootstrap new tasks from seed tasks with a teacher, then answer them",
    "distill": "distill (Vicuna/GPT4All): answer a prompt set with a teacher, multi-turn prompts turn by turn",
    "orca": "Orca explanation traces: task-typed system messages; several teachers = progressive stages",
    "self-chat": "self-chat (Baize): the teacher plays user and assistant from seed topics",
}


def register(sub: Any) -> None:
    from ..generate import GENERATORS

    p = sub.add_parser("generate", help="make imitation data with a teacher (self-instruct, distill, orca, self-chat)",
                       description="Make imitation data with a teacher. Each writes OUT_DIR/records.jsonl + manifest.json; "
                                   "rerunning a killed run resumes from the teacher cache.")
    gsub = p.add_subparsers(dest="generator", metavar="KIND", required=True)
    for name, (module, cls_name) in GENERATORS.items():
        cls = getattr(importlib.import_module(module), cls_name)
        sp = add_stage_parser(gsub, name, cls, _HELP[name], _run)
        sp.set_defaults(generator_module=module, generator_config=cls_name)


def _run(args: argparse.Namespace) -> int:
    from ..config import load_config

    module = importlib.import_module(args.generator_module)
    cfg = load_config(getattr(module, args.generator_config), args.config, args.overrides)
    counts = module.run(cfg)
    print(json.dumps(counts, indent=2))
    print(f"wrote {counts.get('records', 0)} records to {cfg.out_dir}/records.jsonl")
    return 0
