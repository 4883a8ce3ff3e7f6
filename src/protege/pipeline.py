"""`protege run RECIPE.yaml`: run stages in order, each in `runs/<name>/<NN-stage>/`, skipping finished ones.

A recipe names its stages; each stage has a `kind` (which stage function) and a
`config` (that stage's typed config, minus `out_dir`, which the runner sets).
A string anywhere in a config may refer to an earlier stage's folder as
`${stage_name}`, e.g. `prompts: ${selfinstruct}/records.jsonl`.

Skipping and resuming. Each stage gets a fingerprint: its kind, its resolved
config, the fingerprints of the stages it refers to, and the sha256 of any
other input files it names. A stage whose folder holds a completion marker with
the same fingerprint is skipped, so rerunning a finished recipe takes seconds.
A stage that was killed mid-way has a *start* marker but no completion marker:
rerun with the same fingerprint, its folder is kept and the stage resumes from
its own progress (generation cache, training checkpoint). If the fingerprint
changed, the stale folder is cleared first, so a new config never resumes from
old partial work.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from .config import ConfigError, StageConfig, deep_merge, parse_overrides, read_yaml, validate_dict
from .files import atomic_write_text, json_digest, sha256_file
from .outputs import inside, remove_tree
from .stages import STAGE_KINDS, StageKind, stage_kind

__all__ = ["Recipe", "StageSpec", "STAGE_KINDS", "StageKind", "run_recipe", "load_recipe", "stage_kind"]

_REF = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
_HASH_LIMIT = 256 << 20  # inputs larger than this are fingerprinted by size + mtime, not content
# Stage and recipe names become folder names: no separators, no `..`, nothing a shell must quote.
_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _check_name(value: str, what: str) -> str:
    if not _NAME.fullmatch(value) or set(value) == {"."}:
        raise ValueError(f"{what} {value!r} must be letters, digits, `.`, `_` or `-` (it names a folder), "
                         "and not `.` or `..`")
    return value


class StageSpec(StageConfig):
    name: str = Field(..., description="stage name, unique in the recipe; used in ${name} references")
    kind: str = Field(..., description=f"what runs: one of {', '.join(STAGE_KINDS)}")
    config: dict[str, Any] = Field(default_factory=dict, description="the stage's own config (see `protege <stage> --help`)")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value, "stage name")


class Recipe(StageConfig):
    name: str = Field(..., description="run name: outputs go to <runs_dir>/<name>/")
    description: str = Field("", description="what this recipe does")
    runs_dir: str = Field("runs", description="parent folder of all runs")
    stages: list[StageSpec] = Field(..., description="stages, run in order")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value, "recipe name")


def load_recipe(path: str | Path, sets: list[str] | None = None) -> Recipe:
    """Read a recipe; `sets` are `stage.key=value` overrides of a stage's config (or `name=...` of the recipe)."""
    data = read_yaml(path)
    recipe = validate_dict(Recipe, data, str(path))
    names = [s.name for s in recipe.stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: stage names must be unique, got {names}")
    for key, value in parse_overrides(sets or []).items():
        if key in Recipe.model_fields and key != "stages":
            setattr(recipe, key, value)
            continue
        # Override keys come back with `-` spelled `_` (`--max-new-tokens` is `max_new_tokens`), and stage
        # names may hold either: `--set sft-40.model=X` names the stage `sft-40`.
        stage = next((s for s in recipe.stages if s.name == key), None) or next(
            (s for s in recipe.stages if s.name.replace("-", "_") == key), None)
        if stage is None or not isinstance(value, dict):
            raise ConfigError(f"--set {key}...: no stage named `{key}` (stages: {', '.join(names)})")
        stage.config = deep_merge(stage.config, value)
    return recipe


def _substitute(value: Any, dirs: dict[str, Path], refs: set[str], where: str) -> Any:
    if isinstance(value, str):
        def repl(m: re.Match) -> str:
            name = m.group(1)
            if name not in dirs:
                raise ConfigError(f"{where}: `${{{name}}}` does not name an earlier stage (earlier: {', '.join(dirs) or 'none'})")
            refs.add(name)
            return str(dirs[name])
        return _REF.sub(repl, value)
    if isinstance(value, list):
        return [_substitute(v, dirs, refs, where) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, dirs, refs, where) for k, v in value.items()}
    return value


def _named_paths(value: Any) -> list[Path]:
    """Existing files and folders named by the strings of a config (anything path-like)."""
    if isinstance(value, str) and len(value) < 4096 and ("/" in value or value.endswith((".jsonl", ".json", ".yaml"))):
        p = Path(value)
        return [p] if p.exists() else []
    if isinstance(value, (list, dict)):
        return [p for v in (value.values() if isinstance(value, dict) else value) for p in _named_paths(v)]
    return []


def _input_files(value: Any, run_dir: Path) -> list[Path]:
    """Existing files named in a config that do not live in this run (user data: hash them)."""
    return [p for p in _named_paths(value) if p.is_file() and run_dir.resolve() not in p.resolve().parents]


def _file_fingerprint(p: Path) -> str:
    st = p.stat()
    return sha256_file(p) if st.st_size <= _HASH_LIMIT else f"size={st.st_size},mtime={st.st_mtime_ns}"


def _fingerprint(kind: str, config: dict[str, Any], upstream: list[str], files: list[Path]) -> str:
    return json_digest({"kind": kind, "config": config, "upstream": upstream,
                        "files": [[str(f), _file_fingerprint(f)] for f in sorted(files)]})


def _log(msg: str) -> None:
    print(f"[protege run] {msg}", file=sys.stderr, flush=True)


def _stage_config(config_cls: type[StageConfig], resolved: dict[str, Any], stage_dir: Path, where: str) -> StageConfig:
    """The stage's typed config with its output location set by the runner.

    Most stages write into a folder (`out_dir`); a stage that writes one file (the report) gets `output`
    inside the stage folder unless the recipe chose another path.
    """
    fields = config_cls.model_fields
    data = dict(resolved)
    if "out_dir" in fields:
        data["out_dir"] = str(stage_dir)
    elif "output" in fields:
        # A relative `output` lives in the stage folder; no stage writes outside its run (a recipe
        # from someone else must not be able to replace ~/.bashrc).
        name = data.get("output") or Path(str(fields["output"].default or "output")).name
        target = stage_dir / str(name)
        if Path(str(name)).is_absolute() or not inside(target, stage_dir):
            raise ConfigError(f"{where}: output {name!r} must be a relative path inside the stage folder")
        data["output"] = str(target)
    return validate_dict(config_cls, data, where)


def run_recipe(recipe: Recipe, from_stage: str | None = None, only: str | None = None,
               dry_run: bool = False, skip: list[str] | None = None) -> list[dict[str, Any]]:
    """Run (or skip) every stage; return one summary row per stage. `dry_run` only validates and plans.

    `skip` leaves stages out altogether (the user brings what they would make, e.g. their own ShareGPT file
    in place of a teacher's): a later stage that still reads a skipped one is refused before anything runs."""
    names = [s.name for s in recipe.stages]
    skip = list(skip or [])
    for flag, value in (("--from", from_stage), ("--only", only), *(("--skip", s) for s in skip)):
        if value is not None and value not in names:
            raise ConfigError(f"{flag} {value}: no such stage (stages: {', '.join(names)})")
    earlier: dict[str, Path] = {}
    for spec in recipe.stages:  # before any stage runs: every reference names an earlier stage, and none a skipped one
        if spec.name not in skip:
            refs: set[str] = set()
            _substitute(spec.config, earlier, refs, f"recipe {recipe.name}, stage {spec.name}")
            if gone := sorted(refs & set(skip)):
                raise ConfigError(f"recipe {recipe.name}, stage {spec.name}: reads `${{{gone[0]}}}`, which --skip "
                                  f"leaves out; point it at your own file with --set (e.g. --set {spec.name}.KEY=PATH)")
        earlier[spec.name] = Path(spec.name)
    run_dir = Path(recipe.runs_dir) / recipe.name
    if not inside(run_dir, recipe.runs_dir) or run_dir.resolve() == Path(recipe.runs_dir).resolve():
        raise ConfigError(f"recipe {recipe.name}: run folder {run_dir} is not inside {recipe.runs_dir}")
    if not dry_run:  # a dry run plans; it writes nothing
        run_dir.mkdir(parents=True, exist_ok=True)
    dirs: dict[str, Path] = {}
    fingerprints: dict[str, str] = {}
    forced = False
    rows: list[dict[str, Any]] = []
    for index, spec in enumerate(recipe.stages, start=1):
        stage_dir = run_dir / f"{index:02d}-{spec.name}"
        if not inside(stage_dir, run_dir) or stage_dir.is_symlink():
            raise ConfigError(f"recipe {recipe.name}: stage folder {stage_dir} is not inside {run_dir}")
        if spec.name in skip:
            rows.append(_row(spec, "left out", stage_dir))
            continue
        refs: set[str] = set()
        where = f"recipe {recipe.name}, stage {spec.name}"
        resolved = _substitute(spec.config, dirs, refs, where)
        dirs[spec.name] = stage_dir
        config_cls, run_fn = stage_kind(spec.kind)
        config = _stage_config(config_cls, resolved, stage_dir, where)
        files = _input_files(resolved, run_dir)
        own = [f for f in _named_paths(resolved) if inside(f, stage_dir)]
        if own:  # a rerun clears the stage folder before the stage could refuse to overwrite its input
            raise ConfigError(f"{where}: input {own[0]} lies inside the stage's own folder {stage_dir}, which a "
                              "rerun clears; keep inputs outside it (e.g. in another stage's folder or data/)")
        fp = _fingerprint(spec.kind, config.model_dump(mode="json"), [fingerprints[r] for r in sorted(refs)], files)
        fingerprints[spec.name] = fp
        forced = forced or spec.name == from_stage
        if only is not None and spec.name != only:
            rows.append(_row(spec, "not selected", stage_dir))
            continue
        done = _read_marker(stage_dir / ".protege_done.json")
        if done and done.get("fingerprint") == fp and not forced and only is None:
            _log(f"{spec.name}: unchanged since last run, skipped ({stage_dir})")
            rows.append(_row(spec, "skipped", stage_dir, done))
            continue
        started = _read_marker(stage_dir / ".protege_started.json")
        if dry_run:
            rows.append(_row(spec, "would resume" if started and started.get("fingerprint") == fp else "would run", stage_dir))
            continue
        if stage_dir.exists() and (forced or (started or done or {}).get("fingerprint") != fp):
            _log(f"{spec.name}: config or inputs changed; clearing {stage_dir}")
            remove_tree(stage_dir, run_dir)
        elif started:
            _log(f"{spec.name}: resuming an interrupted run in {stage_dir}")
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / ".protege_done.json").unlink(missing_ok=True)
        _write_marker(stage_dir / ".protege_started.json", {"fingerprint": fp, "kind": spec.kind})
        _log(f"{spec.name}: running {spec.kind} -> {stage_dir}")
        t0 = time.time()
        result = run_fn(config) or {}
        seconds = time.time() - t0
        marker = {"fingerprint": fp, "kind": spec.kind, "seconds": round(seconds, 1), "result": _jsonable(result)}
        _write_marker(stage_dir / ".protege_done.json", marker)
        rows.append(_row(spec, "ran", stage_dir, marker))
    if dry_run:
        return rows
    (run_dir / "summary.json").write_text(json.dumps(rows, indent=2, default=str))
    return rows


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _row(spec: StageSpec, status: str, stage_dir: Path, marker: dict[str, Any] | None = None) -> dict[str, Any]:
    marker = marker or {}
    return {"stage": spec.name, "kind": spec.kind, "status": status, "seconds": marker.get("seconds"),
            "dir": str(stage_dir), "result": marker.get("result", {})}


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_marker(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def format_summary(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'stage':<16} {'kind':<24} {'status':<13} {'seconds':>8}  result"]
    for r in rows:
        secs = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        result = ", ".join(f"{k}={v}" for k, v in list((r["result"] or {}).items())[:5] if not isinstance(v, (dict, list)))
        lines.append(f"{r['stage']:<16} {r['kind']:<24} {r['status']:<13} {secs:>8}  {result}")
    return "\n".join(lines)
