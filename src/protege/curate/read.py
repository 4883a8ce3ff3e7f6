"""Reading curate's inputs as one stream: records in order, unique ids, unreadable lines as removal entries.

A record that fails validation on read but that `clean` may repair (empty turns, odd role order) is kept
with `meta["_unchecked"]` = why; the pipeline validates it once cleaning is over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from ..errors import StageError
from ..files import json_lines
from ..formats import convert_obj, iter_source
from ..records import Conversation, Record, RecordError
from .common import log, progress, removal
from .config import CurateConfig

__all__ = ["UNCHECKED", "read_inputs", "IdRenamer"]

UNCHECKED = "_unchecked"  # meta key of a record read loosely (removed by validation)


def _json_objects(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line, object, error) for each non-blank line of JSONL or item of a JSON list."""
    for lineno, obj in json_lines(path, keep_going=True, json_array=True):
        if isinstance(obj, RecordError):
            yield lineno, None, obj.problem
        else:
            yield lineno, obj, None


def _loose_conversation(obj: Any, source: str) -> Conversation | None:
    """A conversation whose turns clean can repair (empty turns, odd role order), or None."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("messages"), list):
        msgs = [{"role": m.get("role"), "content": m.get("content")} for m in obj["messages"] if isinstance(m, dict)]
    elif isinstance(obj.get("conversations"), list):
        msgs = [{"role": m.get("from"), "content": m.get("value")} for m in obj["conversations"] if isinstance(m, dict)]
    elif "instruction" in obj:
        user = "\n\n".join(str(obj.get(k) or "") for k in ("instruction", "input") if str(obj.get(k) or "").strip())
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": obj.get("output")}]
    else:
        return None
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    return Conversation(msgs, id=str(obj.get("id") or ""), source=str(obj.get("source") or source), meta=meta)


class IdRenamer:
    """Rename repeated ids as they stream by (`x`, `x~dup2`, ...) so removed.jsonl and provenance name one record.

    Two inputs often reuse ids (two generation runs both start at `selfinstruct-0000`); refusing them
    would block an ordinary mix, and keeping them would make every later reference ambiguous. The new
    id keeps the old one in `meta.id_renamed_from`; the first renames are logged with both locations.
    """

    def __init__(self) -> None:
        self.first: dict[str, str] = {}  # id -> where it was first seen
        self.renamed = 0

    def __call__(self, rec: Record, where: str) -> None:
        if rec.id not in self.first:
            self.first[rec.id] = where
            return
        k = 2
        while f"{rec.id}~dup{k}" in self.first:
            k += 1
        new = f"{rec.id}~dup{k}"
        if self.renamed < 5:
            log(f"{where}: id {rec.id!r} already used at {self.first[rec.id]}; renamed to {new!r}")
        rec.meta = {**rec.meta, "id_renamed_from": rec.id}
        rec.id = new
        self.first[new] = where
        self.renamed += 1


def read_inputs(cfg: CurateConfig, ids: IdRenamer) -> Iterator[tuple[Record | None, dict[str, Any] | None]]:
    """(record, None) for each input record in order (ids made unique by `ids`), or (None, removal entry) for
    an unreadable one (with skip_invalid; else the first raises with file:line)."""
    repairable = bool(cfg.steps) and cfg.steps[0].step == "clean"
    for src in cfg.inputs:
        path = Path(src)
        if not path.exists():
            raise FileNotFoundError(f"{path}: input not found")
        if path.is_dir() and not (path / "dataset_info.json").exists():
            raise StageError(f"{path}: is a folder; curate reads record files (.jsonl, .json, .parquet, ...) "
                             "or a saved `datasets` folder")
        if path.suffix not in (".jsonl", ".json"):
            for i, rec in enumerate(iter_source(path, cfg.format), 1):  # datasets-readable files: validated rows
                ids(rec, f"{path} row {i}")
                yield rec, None
            continue
        for lineno, obj, problem in progress(_json_objects(path), f"read {path.name}"):
            rec = None
            if problem is None:
                try:
                    rec = convert_obj(obj, cfg.format, path.stem)
                except RecordError as err:
                    problem = err.problem
                    rec = _loose_conversation(obj, path.stem) if repairable else None
                    if rec is not None:
                        rec.meta = {**rec.meta, UNCHECKED: problem}
            if rec is not None:
                ids(rec, f"{path}:{lineno}")
                yield rec, None
                continue
            if not cfg.skip_invalid:
                raise RecordError(f"{problem} (set skip_invalid: true to list such lines in removed.jsonl)", str(path), lineno)
            rid = str(obj.get("id")) if isinstance(obj, dict) and obj.get("id") else f"{path.name}:{lineno}"
            yield None, {**removal(None, "invalid", f"{path}:{lineno}: {problem}", rid=rid, source=path.stem),
                         "step": "read"}
