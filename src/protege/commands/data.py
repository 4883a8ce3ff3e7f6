"""`protege data convert|validate|stats`."""

from __future__ import annotations

import argparse
import json
import sys

from . import Subparsers, add_stage_parser

ORDER = 10


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the epilog's key list kept one key per line."""


def register(sub: Subparsers) -> None:
    p = sub.add_parser("data", help="convert, validate and summarise record files",
                       description="Convert, validate and summarise record files (JSONL).")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    from ..config import config_help
    from ..data_tools import ConvertConfig
    from ..formats import FORMATS

    # The same conversion is the recipe stage `data.convert`, whose keys the epilog lists (positional here).
    c = dsub.add_parser("convert", help="convert Alpaca / ShareGPT / OpenAI / preference (HH, TRL, UltraFeedback, "
                        "WebGPT, ...) / datasets files to protege JSONL",
                        epilog="as a recipe stage (kind: data.convert), with the output in out_dir/records.jsonl:\n"
                               + config_help(ConvertConfig),
                        formatter_class=_Formatter)
    c.add_argument("src", help="input file (.jsonl/.json/.parquet/.csv), saved dataset folder, or hf:org/name for a hub dataset")
    c.add_argument("out", help="output .jsonl")
    c.add_argument("--from", dest="from_format", default="auto", choices=["auto", *FORMATS])
    c.add_argument("--to", dest="to_format", default="protege", choices=["protege", "alpaca", "sharegpt", "openai", "trl"])
    c.add_argument("--source", default=None, help="name written into every record's `source` (default: the record's "
                   "own, else the file's name)")
    c.set_defaults(func=_convert, stage_kind="data.convert")

    v = dsub.add_parser("validate", help="check every line; print FILE:LINE: problem for each bad one (exit 1)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    v.add_argument("files", nargs="+")
    v.add_argument("--kind", default="auto", choices=["auto", "conversation", "comparison"])
    v.set_defaults(func=_validate)

    add_stage_parser(dsub, "sample", "data.sample")
    s = dsub.add_parser("stats", help="counts, turns, characters (and tokens with --model) per role",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("file")
    s.add_argument("--model", default=None, help="model spec whose tokenizer counts tokens")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=_stats)


def _convert(args: argparse.Namespace) -> int:
    from ..data_tools import convert

    skipped: dict[str, int] = {}
    repeated: list[str] = []
    n = convert(args.src, args.out, args.from_format, args.to_format, skipped, repeated, source=args.source)
    note = f"; skipped {sum(skipped.values())} ({', '.join(f'{k}: {v}' for k, v in skipped.items())})" if skipped else ""
    print(f"wrote {n} records to {args.out}{note}")
    if repeated:
        print(f"warning: {len(repeated)} record(s) reuse an earlier record's id (first: {repeated[0]!r}); kept as "
              "they are (`protege curate` renames repeats; `data validate` lists them)", file=sys.stderr)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from ..formats import validate_source

    bad = 0
    for path in args.files:
        good, errors, skipped = validate_source(path, kind=args.kind)
        for err in errors:
            print(err)
        for err in skipped:
            print(f"warning: {err}", file=sys.stderr)
        bad += len(errors)
        status = "ok" if not errors else f"{len(errors)} bad line(s)"
        if skipped:
            status += f", {len(skipped)} unusable pair(s) that training skips and counts"
        print(f"{path}: {good} valid records, {status}", file=sys.stderr)
    return 1 if bad else 0


def _stats(args: argparse.Namespace) -> int:
    from ..data_tools import stats

    tok = None
    if args.model:
        from ..models import load_tokenizer

        tok = load_tokenizer(args.model)
    s = stats(args.file, tok)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"{args.file}: {s['records']} records ({s['conversations']} conversations, {s['comparisons']} comparisons), "
          f"{s['turns']} user turns")
    print(f"sources: {', '.join(f'{k}={v}' for k, v in s['sources'].items())}")
    if s["skipped"]:
        print(f"skipped (unusable pairs): {', '.join(f'{k}={v}' for k, v in s['skipped'].items())}")
    if s.get("pairs"):
        p = s["pairs"]
        print(f"pairs: chosen longer than rejected in {p['chosen_longer_share']:.1%}; "
              f"{p['with_margin']} with a margin (mean {p['mean_margin']})")
    head = f"{'role':<10} {'messages':>9} {'chars':>11} {'mean chars':>11}" + (f" {'tokens':>10} {'mean tok':>9}" if tok else "")
    print(head)
    for role, r in s["per_role"].items():
        line = f"{role:<10} {r['messages']:>9} {r['chars']:>11} {r['mean_chars']:>11}"
        if tok:
            line += f" {r['tokens']:>10} {r['mean_tokens']:>9}"
        print(line)
    return 0
