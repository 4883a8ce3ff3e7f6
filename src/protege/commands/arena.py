"""`protege arena ANSWERS...` (blind A/B page), `protege arena stats DB`, `protege arena export DB --out F`."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Any

from . import Subparsers

ORDER = 96


def register(sub: Subparsers) -> None:
    p = sub.add_parser(
        "arena", help="blind human A/B votes on answer sets (Koala / Chatbot Arena), Bradley-Terry ratings",
        description="`protege arena ANSWERS...` serves the voting page on 127.0.0.1 (answer folders from "
                    "`protege eval answer`); `protege arena stats DB` prints the leaderboard; "
                    "`protege arena export DB --out votes.jsonl|votes.csv` writes the votes.")
    p.add_argument("args", nargs="+", metavar="ANSWERS | stats DB | export DB")
    p.add_argument("--db", default="runs/arena/arena.sqlite", help="votes database (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--token-env", default=None, metavar="VAR",
                   help="restrict the page to raters given the token in $VAR (they open /?token=...)")
    p.add_argument("--out", default=None, help="export: output .jsonl or .csv")
    p.add_argument("--rounds", type=int, default=100, help="stats: bootstrap rounds (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="stats: print JSON")
    p.add_argument("--judge", action="append", default=[], metavar="DIR",
                   help="stats: an `eval judge` pairwise folder; prints the judge's agreement with people (repeatable)")
    p.set_defaults(func=_arena)


def _arena(args: argparse.Namespace) -> int:
    from ..errors import StageError

    if args.args[0] in ("stats", "export"):
        if len(args.args) != 2:
            raise StageError(f"usage: protege arena {args.args[0]} DB")
        return _stats(args.args[1], args) if args.args[0] == "stats" else _export(args.args[1], args)
    from ..arena.app import create_arena_app, load_pool
    from ..arena.db import ArenaDB
    from ..net import is_loopback
    from ..serve.guard import Guard
    from ..serve.protocol import run

    token = os.environ.get(args.token_env, "") if args.token_env else None
    if args.token_env and not token:
        raise StageError(f"--token-env {args.token_env}: that environment variable is not set or empty")
    if not is_loopback(args.host) and not token:
        raise StageError(f"--host {args.host} without --token-env: anyone who can reach the port could vote")
    pool, excluded = load_pool(args.args)
    models = sorted({m for e in pool.values() for m in e["answers"]})
    if len(models) < 2:
        raise StageError(f"the arena needs answers from at least 2 models; found {models or 'none'}")
    for e in excluded[:10]:
        print(f"excluded {e['model']} on {e['prompt_id']}: {e['reason']}", file=sys.stderr)
    db = ArenaDB(args.db)
    app = create_arena_app(db, pool, token=token, guard=Guard(bind=args.host, json_prefixes=("/api/",)))
    print(f"arena: {len(pool)} prompts, models {', '.join(models)} ({len(excluded)} answers excluded); votes -> "
          f"{args.db}; open http://{args.host}:{args.port}/" + ("?token=..." if token else ""), flush=True)
    run(app, args.host, args.port)
    return 0


def _stats(path: str, args: argparse.Namespace) -> int:

    from ..arena.app import votes_of
    from ..arena.db import ArenaDB
    from ..arena.ratings import leaderboard

    from ..arena.analysis import by_category, judge_agreement, random_raters, win_rate_matrix

    db = ArenaDB.existing(path)
    raw = db.votes()
    votes = votes_of(db)
    rows = leaderboard(votes, rounds=args.rounds)
    extra = {"win_rates": win_rate_matrix(votes), "by_category": by_category(raw),
             "random_raters": random_raters(raw),
             "judge_agreement": judge_agreement(raw, args.judge) if args.judge else None}
    if args.json:
        print(json.dumps({"votes": len(votes), "leaderboard": rows, **extra}, indent=2))
        return 0
    print(f"{len(votes)} votes ({sum(v.winner == 'tie' for v in votes)} ties, {sum(v.winner == 'bad' for v in votes)} both bad)")
    print(f"{'model':<28} {'rating':>7} {'95% interval':>17} {'elo':>7} {'battles':>8} {'win rate':>9}")
    for r in rows:
        wr = "–" if r["win_rate"] is None else f"{r['win_rate']:.3f}"
        print(f"{r['model']:<28} {r['rating']:>7.0f} {r['ci_low']:>8.0f}–{r['ci_high']:<8.0f} {r['elo']:>7.0f} "
              f"{r['battles']:>8} {wr:>9}")
    if len(extra["by_category"]) > 1:
        for cat, board in extra["by_category"].items():
            print(f"  {cat}: " + ", ".join(f"{b['model']} {b['rating']:.0f}" for b in board))
    for f in extra["random_raters"]:
        print(f"flagged rater {f['rater_id'][:8]}: {f['votes']} votes not more likely than coin flips "
              f"(p = {f['p_value']:.2f}); kept in the ratings")
    ja = extra["judge_agreement"]
    if ja:
        agree = "–" if ja["agreement_without_ties"] is None else f"{ja['agreement_without_ties']:.3f}"
        kappa = "–" if ja["cohen_kappa"] is None else f"{ja['cohen_kappa']:.3f}"
        print(f"judge vs people on {ja['pairs']} shared pairs: agreement without ties {agree} "
              f"(n={ja['decisive_pairs']}), Cohen's kappa {kappa}")
    return 0


def _csv_cell(value: Any) -> Any:
    """A cell a spreadsheet shows as text: a leading = + - @ (or tab / CR) would make it a formula (OWASP)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _export(path: str, args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..arena.db import ArenaDB
    from ..errors import StageError
    from ..files import atomic_path

    if not args.out:
        raise StageError("export needs --out votes.jsonl or --out votes.csv")
    out = Path(args.out)
    db_files = {Path(path).resolve(), *(Path(f"{path}{x}").resolve() for x in ("-wal", "-shm", "-journal"))}
    if out.resolve() in db_files:
        raise StageError(f"--out {args.out} is the vote database itself; choose another file")
    rows = ArenaDB.existing(path).votes()
    with atomic_path(out) as tmp:
        if out.suffix == ".csv":
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["id"])
                writer.writeheader()
                writer.writerows({k: _csv_cell(v) for k, v in r.items()} for r in rows)
        else:
            with open(tmp, "w", encoding="utf-8") as fh:
                for r in rows:
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} votes to {args.out}")
    return 0
