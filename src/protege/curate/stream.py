"""Curation as a stream: record files between steps, read and written in chunks, steps run in worker processes.

Memory stays bounded by a chunk (plus what a step must index: dedup's keys and MinHash signatures, ~0.7 KB
per record), not by the dataset: 1M conversations curate in well under 4 GB. Steps that judge each record
alone (clean, split, language, quality rules, decontaminate, tag) run on chunks in a process pool, in order
(`imap`), so the output does not depend on the number of workers.

Why a `multiprocessing` pool and not `datasets.map(num_proc=...)`: records carry free-form `meta` per
source, which an Arrow schema would have to unify (or carry as JSON strings, which is what these files
already are), and the steps are Python functions over protege's record classes; the pool runs exactly those
functions on exactly those records. Across machines the same chunks are what Ray Data's `map_batches`
would take (see docs/architecture.md).
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..records import Comparison, Conversation, JsonlWriter, Record

__all__ = ["CHUNK", "record_from_dict", "chunked", "read_chunks", "RecordWriter", "merge_stats", "mapper", "resolve_workers"]

CHUNK = 5000  # records per chunk: large enough to amortise a worker round trip, small enough to bound memory


def record_from_dict(obj: dict[str, Any]) -> Record:
    """A record as curate writes it between steps (already validated, so no checks)."""
    if "chosen" in obj:
        return Comparison(obj["prompt"], obj["chosen"], obj["rejected"], obj.get("margin"), obj["id"], obj["source"],
                          obj["meta"])
    return Conversation(obj["messages"], obj["id"], obj["source"], obj["meta"])


def chunked(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of `size` items (the last one shorter), lazily (`itertools.batched` from Python 3.12)."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def read_chunks(path: str | Path, size: int | None = None) -> Iterator[list[Record]]:
    """The records of a file curate wrote, `size` (default CHUNK) at a time."""
    with Path(path).open(encoding="utf-8") as fh:
        yield from chunked((record_from_dict(json.loads(line)) for line in fh if line.strip()), size or CHUNK)


def RecordWriter(path: str | Path) -> JsonlWriter:
    """Buffered JSONL of records or removal entries (a step's folder is complete only once its state.json is
    written, so these files need no per-line flush)."""
    return JsonlWriter(path, flush=False)


def merge_stats(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Stats of two chunks of one step: counts add, dicts merge key by key, lists concatenate, anything
    else (labels such as the tag step's markers) keeps the first chunk's value."""
    out = dict(a)
    for k, v in b.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, bool) or not isinstance(v, (int, float, dict, list)):
            continue
        elif isinstance(v, (int, float)):
            out[k] = out[k] + v
        elif isinstance(v, dict):
            out[k] = merge_stats(out[k], v)
        else:
            out[k] = out[k] + v
    return out


def resolve_workers(workers: int) -> int:
    """`workers: 0` means one per CPU core this process may use."""
    if workers > 0:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def mapper(workers: int) -> Iterator[Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]]]:
    """An ordered `map` over `workers` processes (the built-in map for one: no pool, no pickling)."""
    if workers <= 1:
        yield map
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        # chunksize 1: a task is already a chunk of records; in order, so results match one worker's
        yield lambda fn, items: pool.imap(fn, items, chunksize=1)
