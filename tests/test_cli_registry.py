"""The CLI and the stage registry agree: every registered stage kind is one command, named after it, whose
`--help` lists its config's keys; every command that takes `--key=value` overrides is a stage or a recipe runner."""

from __future__ import annotations

import argparse

from protege.cli import build_parser
from protege.config import _model_fields
from protege.stages import STAGE_KINDS, stage_kind

# Commands that take a config but run recipes of stages, so they cannot be a stage themselves
# (`sweep` builds a recipe and runs it; a registry entry would make the runner import itself).
RECIPE_RUNNERS = {("sweep",)}


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    out = {path: parser} if path else {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(leaves(sub, path + (name,)))
    return out


def test_every_stage_kind_is_one_command_named_after_it():
    commands = leaves(build_parser())
    by_kind: dict[str, list[tuple[str, ...]]] = {}
    for path, parser in commands.items():
        kind = parser.get_default("stage_kind")
        if kind is not None:
            by_kind.setdefault(kind, []).append(path)
    assert set(by_kind) == set(STAGE_KINDS), f"kinds without a command: {set(STAGE_KINDS) - set(by_kind)}"
    for kind, paths in by_kind.items():
        assert paths == [tuple(kind.split("."))], f"{kind} is run by {paths}"


def test_stage_commands_list_their_config_keys_and_nothing_else_takes_overrides():
    for path, parser in leaves(build_parser()).items():
        kind = parser.get_default("stage_kind")
        if parser.get_default("accepts_overrides"):
            assert kind is not None or path in RECIPE_RUNNERS, f"`protege {' '.join(path)}` takes overrides but is no stage"
        if kind is None or kind == "pull":  # `pull` takes aliases as arguments, not a config
            continue
        epilog = parser.epilog or ""
        config_cls = stage_kind(kind)[0]
        unused = getattr(config_cls, "unused_fields", frozenset())  # inherited keys the stage refuses
        missing = [k for k in _model_fields(config_cls) if k not in unused and not any(f"{p}{k}{s}" in epilog for p, s in ((" --", " "), ("  ", ":"), ("  ", " (")))]
        assert not missing, f"`protege {' '.join(path)} --help` omits {missing}"


def test_a_nested_config_shows_the_default_its_parent_gives_it():
    text = leaves(build_parser())[("eval", "judge")].epilog
    from protege.models import DEFAULT_JUDGE

    assert f"--judge.model  (str, default {DEFAULT_JUDGE!r})" in text


def test_the_architecture_notes_say_where_every_stage_lives():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    where = doc.split("## Where to find X", 1)[1].split("\n## ", 1)[0]
    missing = [kind for kind in STAGE_KINDS if f"`{kind}`" not in where and f"`{kind.split('.')[0]}.*`" not in where]
    assert not missing, f"docs/architecture.md 'Where to find X' does not name {missing}"


def test_help_does_not_import_torch():
    """Issue 26: `protege --help` imported every stage module (and torch, ~1.5 s) to read config classes it
    does not print; only the invoked stage's parser loads its config now."""
    import subprocess
    import sys

    code = ("import sys, contextlib, io\nfrom protege.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['eval', '--help']):\n"
            "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "        main(argv)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    # the invoked stage still gets its full parser, config keys and all
    help_text = subprocess.run([sys.executable, "-m", "protege.cli", "train", "sft", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    assert "--config" in help_text and "learning_rate" in help_text
