"""Curation as a stream: record files between steps, read and written in chunks, steps run in worker processes.

Memory stays bounded by a chunk (plus what a step must index: dedup's keys and MinHash signatures, ~0.7 KB
per record), not by the dataset: 1M conversations curate in well under 4 GB. Steps that judge each record
alone (clean, split, language, quality rules, decontaminate, tag) run on chunks in a process pool, in order
(`imap`), so the output does not depend on the number of workers.

Why a `multiprocessing` pool and not `datasets.map(num_proc=...)`: records carry free-form `meta` per
source, which an Arrow schema would have to unify (or carry as JSON strings, which is what these files
already are), and the steps are Python functions over protege's record classes; the pool runs exactly those
functions on exactly those records.

Across machines (`ray_address`), each chunk is one Ray task: the same function on the same chunk, results
taken back in order, so a cluster's output equals one worker's too. Ray core tasks rather than Ray Data's
`map_batches` for the reason above (Ray Data moves batches as Arrow tables). A user with a cluster already
runs Ray (KubeRay, `ray start` on each node, the cluster vLLM and RLHF frameworks run on); joining it is one
address, and protege must be installed on every node.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..files import json_lines
from ..records import Comparison, Conversation, JsonlWriter, Record

__all__ = ["CHUNK", "record_from_dict", "chunked", "read_chunks", "RecordWriter", "merge_stats", "mapper",
           "ray_connection", "ray_mapper", "resolve_workers"]

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
    yield from chunked((record_from_dict(obj) for _, obj in json_lines(path, allow_nan=True)), size or CHUNK)


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
def mapper(workers: int, ray_address: str | None = None
           ) -> Iterator[Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]]]:
    """An ordered `map` over `workers` processes (the built-in map for one: no pool, no pickling), or over a
    Ray cluster's CPUs when `ray_address` is given."""
    if ray_address is not None:
        with ray_mapper(ray_address) as map_fn:
            yield map_fn
        return
    if workers <= 1:
        yield map
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        # chunksize 1: a task is already a chunk of records; in order, so results match one worker's
        yield lambda fn, items: pool.imap(fn, items, chunksize=1)


@contextmanager
def ray_connection(address: str | None) -> Iterator[None]:
    """Connected to Ray for the duration (nothing when `address` is None): "auto" joins the cluster `ray start`
    made (or RAY_ADDRESS), "local" starts a Ray instance on this machine, anything else is a cluster address
    (`ray://host:10001`, `host:6379`). Disconnects only if it connected."""
    if address is None:
        yield
        return
    from ..errors import StageError

    try:
        import ray
    except ImportError:
        raise StageError("curate: ray_address needs Ray on this machine and every node "
                         "(pip install 'protege[ray]')") from None
    started = not ray.is_initialized()
    if started:
        _check_reachable(address)
        try:
            # "local" is Ray's own word for a new instance here (no address would join a `ray start` one)
            ray.init(address=address, log_to_driver=False,
                     include_dashboard=False, configure_logging=False)
        except ConnectionError as exc:
            raise _no_cluster(address, exc) from None
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes, on a `host:port` with nothing listening (ray.init retries for ~5 min)."""
    import socket

    if address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise _no_cluster(address, exc) from None


def _no_cluster(address: str, exc: Exception) -> Exception:
    from ..errors import StageError

    return StageError(f"curate: no Ray cluster at ray_address={address!r} ({exc}); start one with "
                      "`ray start --head`, or use ray_address: local")


@contextmanager
def ray_mapper(address: str) -> Iterator[Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]]]:
    """An ordered `map` whose calls are Ray tasks (one per chunk). At most two tasks per cluster CPU are in
    flight, so the driver's memory stays bounded by a few chunks however large the input."""
    with ray_connection(address):
        import ray

        window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))

        def ordered(fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
            task = ray.remote(num_cpus=1)(fn)
            pending: collections.deque = collections.deque()
            for item in items:
                pending.append(task.remote(item))
                if len(pending) >= window:
                    yield ray.get(pending.popleft())
            while pending:
                yield ray.get(pending.popleft())

        yield ordered
