"""Where a stage may write, and how: inside its own folder, never over its inputs, all or nothing.

Three rules every stage follows:

- `inside(path, root)`: a path a recipe or stage writes or deletes is resolved (symlinks and `..`
  included) and must lie inside the folder it belongs to; `remove_tree` deletes only such paths.
- `refuse_clobber(inputs, outputs)`: an output that is one of the stage's inputs (the same file, or
  a folder that holds one) is refused before anything is read, so a typo cannot replace the data.
- `publish(out_dir)`: a stage that writes its outputs in one go writes them into a hidden staging
  folder and moves them into `out_dir` only when all are written, the manifest last. A run that
  fails mid-write leaves the previous outputs (and their manifest) as they were.

A folder's outputs are trustworthy exactly when its `manifest.json` exists: the manifest is always
the last file written, and stages that resume in place (generation, training) delete the old
manifest before they write anything (`begin`).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import StageError

__all__ = ["inside", "remove_tree", "refuse_clobber", "refuse_config_clobber", "publish", "begin", "STAGING"]

STAGING = ".partial"
MANIFEST = "manifest.json"


def inside(path: str | Path, root: str | Path) -> bool:
    """True if `path`, resolved, is `root` or lies below it (resolved too)."""
    p, r = Path(path).resolve(), Path(root).resolve()
    return p == r or r in p.parents


def remove_tree(path: str | Path, root: str | Path) -> None:
    """`shutil.rmtree(path)`, refused unless `path` lies strictly inside `root`."""
    path = Path(path)
    if not inside(path, root) or path.resolve() == Path(root).resolve():
        raise StageError(f"refusing to delete {path}: it is not inside {root}")
    if path.is_symlink():  # a link that points elsewhere is removed, never followed
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return [p.resolve() for p in path.rglob("*") if p.is_file()]
    return [path.resolve()] if path.exists() else []


def refuse_clobber(inputs: Iterable[str | Path], outputs: Iterable[str | Path], what: str = "") -> None:
    """Raise StageError if writing `outputs` (files or folders) would replace any of `inputs`.

    An output file must not be an input file; an output folder must not hold an input file (a stage
    replaces the known files in its folder, and clears it when its config changes).
    """
    prefix = f"{what}: " if what else ""
    input_files = {f: Path(src) for src in inputs for f in _files(Path(src))}
    for out in outputs:
        o = Path(out).resolve()
        for f, src in input_files.items():
            if f == o or o in f.parents:
                raise StageError(f"{prefix}output {out} would overwrite the input {src}; choose another output path")


_OUTPUT_FIELDS = ("out_dir", "output")


def _named_paths(value: object, skip: tuple[str, ...] = _OUTPUT_FIELDS) -> list[str]:
    """Every string in a config (nested models, lists, dicts) that names an existing file."""
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        return [p for name in type(value).model_fields if name not in skip
                for p in _named_paths(getattr(value, name), ())]
    if isinstance(value, dict):
        return [p for v in value.values() for p in _named_paths(v, ())]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _named_paths(v, ())]
    if isinstance(value, str) and 0 < len(value) < 4096 and "\n" not in value:
        try:
            return [value] if Path(value).is_file() else []
        except OSError:
            return []
    return []


def refuse_config_clobber(config: object, kind: str) -> None:
    """Every stage, before it runs: no input file it names may be its output file or lie in its out_dir."""
    outputs = [str(getattr(config, f)) for f in _OUTPUT_FIELDS if getattr(config, f, None)]
    if outputs:
        refuse_clobber(_named_paths(config), outputs, kind)


@contextmanager
def publish(out_dir: str | Path) -> Iterator[Path]:
    """Yield a staging folder; on success move its files into `out_dir` (manifest last), else drop it.

    Each move is an atomic rename on one filesystem. The old manifest is removed before the first
    move, so a crash between moves leaves a folder without a manifest (visibly unfinished), never
    new files described by an old manifest.
    """
    out = Path(out_dir)
    stage = out / STAGING
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    (out / MANIFEST).unlink(missing_ok=True)
    names = sorted((p.relative_to(stage) for p in stage.rglob("*") if p.is_file()), key=lambda r: (str(r) == MANIFEST, r))
    for rel in names:
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / rel, target)
    shutil.rmtree(stage, ignore_errors=True)


def begin(out_dir: str | Path) -> Path:
    """Make `out_dir` and drop its manifest: from here until the new manifest, the folder is unfinished."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    return out
