"""Plain-text corpora for tokenizer training and pretraining, streamed document by document.

A source is one of:
- a `.txt` file: documents separated by `separator` (TinyStories' `<|endoftext|>`); a file without
  the separator is one document (a book);
- a `.jsonl` file: one document per line, its text in the `text_field` field;
- a `.parquet` file: the `text_field` column, read one row group at a time;
- `datasets:PATH`: a dataset saved with `datasets`' `save_to_disk` (its `train` split if it is a
  `DatasetDict`), or `datasets:NAME` for `load_dataset(NAME, split="train", streaming=True)`;
- `builtin:python-docs`: protege's offline default (below).

Every reader yields documents one at a time, so memory stays bounded whatever the corpus size.

The built-in corpora are what every CPython installation carries (PSF License 2.0, as Python itself):
`builtin:python-docs`, the English documentation — docstrings of the standard library (modules,
classes, functions; test suites excluded) and the language reference topics of `pydoc_data`, ~2.1 MB
on CPython 3.11; and `builtin:python-stdlib`, the standard library's source files themselves (code,
comments and docstrings), ~11 MB. They need no download, so a fresh machine can pretrain offline; their
exact text depends on the Python version, which the manifest records with the corpus hash. They are
small: for more than a CPU-sized model point `datasets` at real text.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Iterator

from .errors import RecordError, UserError

__all__ = ["BUILTIN_CORPORA", "CorpusError", "iter_documents", "builtin_python_docs", "builtin_python_stdlib", "describe_source", "held_out"]

BUILTIN_CORPORA = {
    "builtin:python-docs": "docstrings of the Python standard library + pydoc language topics (PSF License 2.0)",
    "builtin:python-stdlib": "the Python standard library's source files, one document each (PSF License 2.0)",
}
_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}


def _stdlib_files() -> Iterator[Path]:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if not _SKIP & set(path.relative_to(stdlib).parts):
            yield path


def builtin_python_stdlib() -> Iterator[str]:
    """Every standard-library module's source (code with its comments and docstrings), ~11 MB on 3.11."""
    for path in _stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield text


def builtin(source: str) -> Iterator[str]:
    return builtin_python_docs() if source == "builtin:python-docs" else builtin_python_stdlib()


class CorpusError(UserError, ValueError):
    """A corpus source that cannot be read as documents."""


def builtin_python_docs() -> Iterator[str]:
    """The standard library's docstrings and pydoc topics, in a fixed (sorted) order."""
    import ast

    import pydoc_data.topics

    for name in sorted(pydoc_data.topics.topics):
        yield pydoc_data.topics.topics[name].strip()
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 50:  # one-liners ("Return self.") teach little and are legion
                    yield doc


def _txt(path: Path, separator: str) -> Iterator[str]:
    # Read in blocks and split on the separator, so a multi-GB file is never held whole.
    buf = ""
    with path.open("r", encoding="utf-8", errors="strict", newline="") as fh:
        while True:
            try:
                block = fh.read(1 << 20)
            except UnicodeDecodeError as err:
                raise CorpusError(f"{path}: not UTF-8 text ({err.reason} near byte {err.start} of a block)") from None
            if not block:
                break
            buf += block
            *docs, buf = buf.split(separator) if separator else ("", buf)
            for d in docs:
                if d.strip():
                    yield d.strip()
    if buf.strip():
        yield buf.strip()


def _jsonl(path: Path, field: str) -> Iterator[str]:
    from .files import json_lines

    for line, row in json_lines(path):
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            got = type(row.get(field)).__name__ if isinstance(row, dict) and field in row else "no such field"
            raise RecordError(f"{path}:{line}: field `{field}` must be a string (got {got}); "
                              "set text_field to the field that holds the text")
        if row[field].strip():
            yield row[field]


def _parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise CorpusError(f"{path}: no column `{field}` (columns: {', '.join(pf.schema_arrow.names)}); set text_field")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text


def _hf_dataset(spec: str, field: str) -> Iterator[str]:
    import datasets

    if Path(spec).exists():
        ds = datasets.load_from_disk(spec)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    else:
        ds = datasets.load_dataset(spec, split="train", streaming=True)
    for row in ds:
        text = row.get(field)
        if not isinstance(text, str):
            raise CorpusError(f"datasets:{spec}: rows have no string field `{field}` (fields: {', '.join(row)}); "
                              "set text_field")
        if text.strip():
            yield text


def iter_documents(source: str, text_field: str = "text", separator: str = "<|endoftext|>") -> Iterator[str]:
    """Documents (non-empty strings) of one corpus source, in file order. See the module docstring."""
    if source in BUILTIN_CORPORA:
        yield from builtin(source)
        return
    if source.startswith("builtin:"):
        raise CorpusError(f"unknown built-in corpus `{source}` (known: {', '.join(BUILTIN_CORPORA)})")
    if source.startswith("datasets:"):
        yield from _hf_dataset(source[len("datasets:"):], text_field)
        return
    path = Path(source)
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {source} (give .txt, .jsonl, .parquet, datasets:PATH_OR_NAME "
                          f"or one of {', '.join(BUILTIN_CORPORA)})")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from _jsonl(path, text_field)
    elif suffix == ".parquet":
        yield from _parquet(path, text_field)
    elif suffix in (".txt", ".text", ".md", ""):
        yield from _txt(path, separator)
    else:
        raise CorpusError(f"{source}: unknown corpus format `{suffix}` (expected .txt, .md, .jsonl, .parquet)")


@functools.lru_cache(maxsize=None)
def _builtin_digest(source: str) -> str:
    """sha256 of a built-in corpus: fixed for the life of the process (a scaling sweep asks once per run, and
    `builtin:python-docs` parses the whole standard library to answer)."""
    digest = hashlib.sha256()
    for doc in builtin(source):
        digest.update(doc.encode("utf-8") + b"\0")
    return digest.hexdigest()


def describe_source(source: str) -> dict[str, str]:
    """What a data card records of a source: its sha256 (files) or its name and provenance (built-ins)."""
    if source in BUILTIN_CORPORA:
        import platform

        return {"source": source, "provenance": BUILTIN_CORPORA[source],
                "python": platform.python_version(), "sha256": _builtin_digest(source)}
    if Path(source).is_file():
        from .files import sha256_file

        return {"source": source, "sha256": sha256_file(source)}
    return {"source": source, "sha256": json.dumps(None)}


def held_out(doc: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out split: decided by a hash of its text, so the split does
    not depend on order or on how many documents come later, and repeated documents never straddle it."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(doc.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
    return h / 2**64 < fraction
