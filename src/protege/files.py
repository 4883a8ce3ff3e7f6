"""One I/O kit for every stage: JSONL reading, atomic writes, content hashes.

- `parse_jsonl_line` decodes one line strictly: invalid UTF-8, bad JSON, NaN/Infinity (not JSON, and
  they poison a mean), integers too long to read, nesting deep enough to exhaust the parser, and lone
  UTF-16 surrogates (they cannot be written back as UTF-8) are each a `RecordError` saying which.
- `jsonl_rows` / `read_jsonl`: every non-blank line of a file, each a JSON object; a bad line is a
  `RecordError` naming `file:line`. For inputs a person wrote.
- `tolerant_jsonl`: the same lines, skipping any that do not parse. For append-only logs and caches that
  protege itself writes, whose last line a kill may have cut: that item is simply done again.
- `allow_nan`: NaN/Infinity are refused in what people write, but protege's own outputs (metrics, bench
  items, judgments) may hold them, as `json.dumps` writes them: readers of those files pass `allow_nan=True`.
- `atomic_path` / `atomic_write_text` / `atomic_write_json`: write beside the target and rename over it,
  so a reader (or a crash) sees the old file or the new one, never half of one. `atomic_dir` does the
  same for a folder (a checkpoint, a converted model, an exported HF folder).
- `json_digest`: sha256 of a value's canonical JSON, the one key of every content-addressed thing protege
  keeps (record ids, teacher requests, cached reference log-probs and bench items, resume fingerprints).
  `sha256_file` / `sha256_path` hash a file or a folder as it lies on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

from .errors import RecordError

__all__ = ["parse_jsonl_line", "json_lines", "jsonl_rows", "read_jsonl", "tolerant_jsonl", "atomic_path", "atomic_write_text",
           "atomic_write_json", "atomic_dir", "json_digest", "sha256_file", "sha256_path"]

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _refuse_constant(name: str) -> Any:
    raise RecordError(f"{name} is not a JSON number (write null or a finite number)")


def parse_jsonl_line(line: str | bytes, allow_nan: bool = False) -> Any:
    """One JSONL line -> its value; None for a blank line; RecordError (without location) when it is not JSON."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RecordError(f"invalid UTF-8 at byte {err.start}") from None
    line = line.lstrip("\ufeff")  # a byte-order mark, as Windows editors write on the first line
    if not line.strip():
        return None
    try:
        obj = json.loads(line) if allow_nan else json.loads(line, parse_constant=_refuse_constant)
    except json.JSONDecodeError as err:
        raise RecordError(f"bad JSON: {err.msg} at column {err.colno}") from None
    except RecursionError:
        raise RecordError("JSON nested too deeply to read") from None
    except ValueError as err:  # an int longer than Python's digit limit (sys.get_int_max_str_digits)
        raise RecordError(f"bad JSON: a number too long to read ({str(err).split(':')[0]}); write it as a string") from None
    if _SURROGATE_ESCAPE.search(line):
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise RecordError("a string holds a lone UTF-16 surrogate (\\ud800-\\udfff without its pair)") from None
    return obj


def json_lines(path: str | Path, text: str | None = None, keep_going: bool = False,
               json_array: bool = False, allow_nan: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of `path` (or of `text`, named `path` in errors).

    A bad line raises `RecordError` naming `file:line`; with `keep_going` it is yielded as (line, that
    error) instead, so a validator can report every bad line. With `json_array`, a `.json` file holding
    one JSON array yields (item number, item) for its items.
    """
    path = Path(path)
    if json_array and text is None and path.suffix == ".json":
        with path.open("rb") as fh:
            is_array = fh.read(64).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
        if is_array:
            try:
                data = parse_jsonl_line(path.read_bytes(), allow_nan)
            except RecordError as err:
                raise RecordError(err.problem, str(path), 1) from None
            yield from enumerate(data, start=1)
            return
    if text is None and path.exists() and not path.is_file():  # a FIFO or device would block or never end
        raise RecordError(f"{path}: not a regular file (a folder, pipe or device?)")
    lines: Any = text.splitlines() if text is not None else path.open("rb")
    try:
        for n, line in enumerate(lines, 1):
            try:
                obj = parse_jsonl_line(line, allow_nan)
            except RecordError as err:
                bad = RecordError(err.problem, str(path), n)
                if not keep_going:
                    raise bad from None
                yield n, bad
                continue
            if obj is not None:
                yield n, obj
    finally:
        if text is None:
            lines.close()


def jsonl_rows(path: str | Path, text: str | None = None,
               allow_nan: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a bad line or a non-object is a `RecordError` at `file:line`."""
    for n, obj in json_lines(path, text, allow_nan=allow_nan):
        if not isinstance(obj, dict):
            raise RecordError(f"expected a JSON object, got {type(obj).__name__}", str(Path(path)), n)
        yield n, obj


def read_jsonl(path: str | Path, allow_nan: bool = False) -> list[dict[str, Any]]:
    """Every object of a JSONL file, strictly (see `jsonl_rows`)."""
    return [obj for _, obj in jsonl_rows(path, allow_nan=allow_nan)]


def tolerant_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """The objects of a log protege appends to; lines that do not parse (cut by a kill) are skipped; no file: none."""
    if Path(path).exists():
        yield from (obj for _, obj in json_lines(path, keep_going=True, allow_nan=True) if isinstance(obj, dict))


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary sibling of `path` to write; renamed over `path` when the block ends without error, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path, tmp: str | Path | None = None) -> Iterator[Path]:
    """A fresh folder to fill (`tmp`, default `path` + ".partial"); it replaces `path` when the block ends
    without error (the old folder is removed only then, so the input of a re-export survives until its
    replacement is complete), and is removed otherwise."""
    path = Path(path)
    work = Path(tmp) if tmp is not None else path.with_name(path.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        yield work
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        os.replace(work, path)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


# ---- content hashes ------------------------------------------------------------------------------


def json_digest(payload: Any, size: int | None = None) -> str:
    """sha256 (hex) of the canonical JSON of `payload`: sorted keys, no spaces, UTF-8 as is, so the same
    value has the same key however its dicts were built. `size` keeps the first `size` hex digits (a file
    name); a cache key that must never collide keeps all 64."""
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(blob.encode("utf-8")).hexdigest()
    return digest if size is None else digest[:size]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 (hex) of one file's bytes, read in chunks (a model file does not fit a read())."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a folder (sorted relative names + file hashes)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()
