"""`protege export MODEL_OR_RUN --out DIR [--gguf f16,q8_0,q4_0,q4_k_m] [--no-verify]`."""

from __future__ import annotations

import argparse
import json

from . import Subparsers, add_stage_parser

ORDER = 85


def register(sub: Subparsers) -> None:
    p = add_stage_parser(sub, "export", "export", _export,
                         help="merge a model / adapter / training run into an HF folder and write GGUF files "
                         "(llama.cpp's converter and quantizer), checked in llama.cpp")
    p.add_argument("model_pos", nargs="?", metavar="MODEL_OR_RUN", help="alias, HF folder, adapter or run folder")
    p.add_argument("--out", "--out_dir", dest="out", default=None, help="output folder (the config's `out_dir`)")
    p.add_argument("--gguf", default=None, help="comma-separated GGUF types, e.g. f16,q8_0,q4_0,q4_k_m")
    p.add_argument("--no-verify", action="store_true", help="skip the llama.cpp checks")


def _export(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..stages import stage_kind

    overrides = list(args.overrides)
    for flag, key in ((args.model_pos, "model"), (args.out, "out_dir"), (args.gguf, "gguf")):
        if flag is not None:
            overrides.append(f"--{key}={flag}")
    if args.no_verify:
        overrides.append("--verify=false")
    config_cls, run = stage_kind("export")
    cfg = load_config(config_cls, args.config, overrides)
    result = run(cfg)
    print(json.dumps(result, indent=2))
    verify = f"{cfg.out_dir}/verify.md"
    print(f"HF folder: {cfg.out_dir}/hf" + (f"; GGUF files and checks: {verify}" if cfg.gguf else ""))
    return 0
