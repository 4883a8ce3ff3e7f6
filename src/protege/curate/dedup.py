"""`dedup`: exact duplicates (normalized text) then near-duplicates (MinHash + LSH), one record per cluster.

The earliest record of a cluster is kept, so the result does not depend on anything but
input order. The card lists the largest clusters with an example of what was dropped.
`run` streams: two passes over the chunks of a file, signatures computed chunk by chunk (in
worker processes when given a pool's map); `apply` is the same on an in-memory list.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import xxhash

from ..records import Record
from .common import Context, StepResult, normalize, removal, texts
from .config import DedupStep

__all__ = ["apply", "run", "exact_key"]

_EXAMPLE_CHARS = 300


def exact_key(rec: Record, mode: str) -> int:
    """64-bit hash of the normalized first user turn or whole conversation (roles included)."""
    if mode == "first_user":
        text = normalize(texts(rec, "first_user")[0])
    else:
        from .common import messages_of

        text = "\x1e".join(f"{m['role']}\x1f{normalize(m['content'])}" for m in messages_of(rec))
    return xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"))


def _preview(rec: Record, scope: str) -> str:
    text = " / ".join(texts(rec, "first_user" if scope == "first_user" else "all"))
    return text[:_EXAMPLE_CHARS] + ("…" if len(text) > _EXAMPLE_CHARS else "")


def _sign(task: tuple[list[str], int, int, int]) -> Any:
    """MinHash signatures of one chunk's texts (a worker's task; top level, so a pool can pickle it)."""
    from .minhash import text_signatures

    return text_signatures(*task)


def run(chunks: Callable[[], Iterator[list[Record]]], opts: DedupStep, ctx: Context | None = None,
        emit: Callable[[list[Record], list[dict[str, Any]]], None] = lambda kept, removed: None,
        map_fn: Callable[..., Iterator[Any]] = map) -> dict[str, Any]:
    """Dedup a stream in two passes over `chunks()` (called twice): keys and signatures, then decisions,
    handed to `emit(kept, removed)` chunk by chunk in input order. Memory: a key and an id per record, and
    `num_perm` 32-bit values per record surviving the exact pass. Returns the step's stats."""
    import numpy as np

    exact = opts.exact != "none"
    first: dict[int, str] = {}  # exact key -> id of its earliest record
    dups: dict[int, int] = {}  # key -> duplicates seen, in order of the first duplicate (top-cluster ties)
    near = opts.near
    seed = (ctx.seed if ctx else 0) + 1

    def survivors_texts() -> Iterator[tuple[list[str], int, int, int]]:  # pass 1 (runs as the pool consumes it)
        for chunk in chunks():
            texts_: list[str] = []
            for rec in chunk:
                if exact:
                    key = exact_key(rec, opts.exact)
                    if key in first:
                        dups[key] = dups.get(key, 0) + 1
                        continue
                    first[key] = rec.id
                if near:
                    texts_.append("\n".join(texts(rec, opts.near_text)))
            yield texts_, opts.ngram, opts.num_perm, seed

    parts = [sig for sig in map_fn(_sign, survivors_texts()) if sig.shape[1]] if near else list(survivors_texts())
    n_survivors = sum(p.shape[1] for p in parts) if near else 0
    nd = None
    if near and n_survivors > 1:
        from .minhash import clusters_from_signatures

        nd = clusters_from_signatures(np.concatenate(parts, axis=1), opts.threshold)
    del parts
    top_exact = sorted(dups, key=lambda k: -dups[k])[: opts.top_clusters]  # stable: ties by first duplicate
    near_clusters = nd.clusters() if nd is not None else []
    wanted_near = {m: c for c, members in enumerate(near_clusters[: opts.top_clusters]) for m in members[:20]}
    exact_members: dict[int, list[Record]] = {k: [] for k in top_exact}
    near_members: dict[int, list[tuple[int, Record]]] = {}
    survivor_ids: list[str] = []
    n_exact = n_near = 0
    for chunk in chunks():  # pass 2: decisions in input order
        kept, removed = [], []
        for rec in chunk:
            key = exact_key(rec, opts.exact) if exact else None
            if key is not None and key in exact_members and len(exact_members[key]) < 20:
                exact_members[key].append(rec)
            if key is not None and first[key] != rec.id:
                n_exact += 1
                removed.append(removal(rec, "exact_duplicate",
                                       f"same normalized {opts.exact.replace('_', ' ')} as {first[key]}"))
                continue
            j = len(survivor_ids)
            survivor_ids.append(rec.id if nd is not None else "")
            if j in wanted_near:
                near_members.setdefault(wanted_near[j], []).append((j, rec))
            root = int(nd.root[j]) if nd is not None else j
            if root == j:
                kept.append(rec)
            else:
                n_near += 1
                removed.append(removal(rec, "near_duplicate",
                                       f"estimated Jaccard {nd.similarity[j]:.2f} with {survivor_ids[root]} (kept)"))
        emit(kept, removed)

    clusters_out: list[dict[str, Any]] = []
    for key in top_exact:
        members = exact_members[key]
        clusters_out.append({"kind": "exact", "size": dups[key] + 1, "kept": members[0].id,
                             "members": [m.id for m in members], "kept_text": _preview(members[0], opts.exact),
                             "example": _preview(members[1], opts.exact), "similarity": 1.0})
    stats: dict[str, Any] = {"exact_duplicates": n_exact, "near_duplicates": 0}
    if nd is not None:
        stats.update(near_duplicates=n_near, near_clusters=len(near_clusters), candidate_pairs=nd.candidates,
                     lsh_bands=nd.bands, lsh_rows=nd.rows)
        for c, members in enumerate(near_clusters[: opts.top_clusters]):
            recs = near_members[c]
            clusters_out.append({"kind": "near", "size": len(members), "kept": recs[0][1].id,
                                 "members": [r.id for _, r in recs], "kept_text": _preview(recs[0][1], opts.near_text),
                                 "example": _preview(recs[1][1], opts.near_text),
                                 "similarity": round(float(nd.similarity[recs[1][0]]), 3)})
    # near clusters first among equal sizes: exact copies are self-explanatory, near ones need a look
    stats["top_clusters"] = sorted(clusters_out, key=lambda c: (-c["size"], c["kind"] != "near"))[: opts.top_clusters]
    return stats


def apply(records: list[Record], opts: DedupStep, ctx: Context | None = None) -> StepResult:
    """Drop exact then near duplicates of an in-memory list (`run` over one chunk)."""
    kept: list[Record] = []
    removed: list[dict[str, Any]] = []

    def emit(k: list[Record], r: list[dict[str, Any]]) -> None:
        kept.extend(k)
        removed.extend(r)

    stats = run(lambda: iter([records]), opts, ctx, emit)
    return StepResult(kept, removed, stats=stats)
