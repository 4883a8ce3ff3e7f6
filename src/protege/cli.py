"""`protege` command line: parses arguments and calls the library; no logic of its own.

Each module in `protege.commands` contributes subcommands through
`register(subparsers)`; `ORDER` sorts them in `protege --help`.
Stage commands take `--config FILE.yaml` and any number of `--key=value` /
`--section.key=value` overrides of that stage's config.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands
from .config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protege",
        description="Turn an open base LM into a chat assistant (imitation data, curation, SFT, preference "
                    "learning), measure style vs substance honestly, and ship it.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    modules = [importlib.import_module(f"{commands.__name__}.{m.name}")
               for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")]
    for module in sorted(modules, key=lambda m: (getattr(m, "ORDER", 50), m.__name__)):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands.INVOKED = [a for a in argv if not a.startswith("-")]  # only the invoked stage loads its config
    try:
        parser = build_parser()
    finally:
        commands.INVOKED = None
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 — user-facing errors below, everything else re-raised
        from .errors import USER_ERRORS

        if isinstance(err, USER_ERRORS):
            print(f"error: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
