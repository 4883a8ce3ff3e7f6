"""`protege run RECIPE.yaml` (and `protege sweep`)."""

from __future__ import annotations

import argparse

from . import Subparsers

ORDER = 1


def register(sub: Subparsers) -> None:
    p = sub.add_parser("run", help="run a recipe: stages in order, finished ones skipped, killed ones resumed",
                       description="Run a recipe (YAML listing stages and their configs). Outputs go to "
                                   "<runs_dir>/<name>/<NN-stage>/ with a manifest each.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/quickstart.yaml")
    p.add_argument("--from", dest="from_stage", default=None, help="rerun this stage and every later one")
    p.add_argument("--only", default=None, help="run only this stage")
    p.add_argument("--skip", default=None, metavar="STAGE[,STAGE...]",
                   help="leave these stages out (bring your own data in their place with --set)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override a stage's config (repeatable), e.g. --set sft.max_steps=10")
    p.add_argument("--dry-run", action="store_true", help="validate every stage's config and show what would run")
    p.set_defaults(func=_run)
    register_sweep(sub)


def _run(args: argparse.Namespace) -> int:
    from ..pipeline import format_summary, load_recipe, run_recipe

    recipe = load_recipe(args.recipe, args.sets)
    rows = run_recipe(recipe, from_stage=args.from_stage, only=args.only, dry_run=args.dry_run,
                      skip=[s for s in (args.skip or "").split(",") if s])
    print(format_summary(rows))
    if not args.dry_run:
        _print_next_steps(rows)
    return 0


def _print_next_steps(rows: list[dict]) -> None:
    """Where the report is and how to talk to the model the recipe trained."""
    from pathlib import Path

    for row in rows:
        result = row["result"] if isinstance(row["result"], dict) else {}
        if "html" in result:
            print(f"\nreport: {result['html']}" + (f"  (text: {result['markdown']})" if "markdown" in result else ""))
    trained = [Path(r["dir"]) for r in rows if r["kind"].startswith("train.") and r["status"] in ("ran", "skipped")]
    for folder in trained[-1:]:
        model = next((folder / name for name in ("merged", "model", "adapter") if (folder / name).exists()), None)
        if model is not None:
            print(f"\nchat with it:   protege chat {model}\nserve it:       protege serve {model}"
                  "   (chat page + OpenAI API at http://127.0.0.1:8000)")


def register_sweep(sub: Subparsers) -> None:
    from ..commands import add_config_parser
    from ..sweep import SweepConfig

    add_config_parser(sub, "sweep", SweepConfig,
                     "the False Promise experiment: SFT on N imitation examples for several N, bench + judge each, "
                     "plot style and substance against N", _sweep)


def _sweep(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..sweep import SweepConfig, run

    result = run(load_config(SweepConfig, args.config, args.overrides))
    print(f"sweep: {result['points']} points\nfigure and table: {result['html']}")
    return 0
