"""`dedup`: exact duplicates (normalized text) then near-duplicates (MinHash + LSH), one record per cluster.

The earliest record of a cluster is kept, so the result does not depend on anything but
input order. The card lists the largest clusters with an example of what was dropped.
"""

from __future__ import annotations

from typing import Any

import xxhash

from ..records import Record
from .common import StepResult, normalize, removal, texts
from .config import DedupStep
from .minhash import near_duplicate_clusters

__all__ = ["apply", "exact_key"]

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


def apply(records: list[Record], opts: DedupStep, ctx: Any = None) -> StepResult:
    """Drop exact then near duplicates; stats hold cluster sizes and the top clusters with examples."""
    removed: list[dict[str, Any]] = []
    exact_groups: dict[int, list[Record]] = {}
    kept = records
    if opts.exact != "none":
        first: dict[int, Record] = {}
        kept = []
        for rec in records:
            key = exact_key(rec, opts.exact)
            if key in first:
                removed.append(removal(rec, "exact_duplicate", f"same normalized {opts.exact.replace('_', ' ')} as {first[key].id}"))
                exact_groups.setdefault(key, [first[key]]).append(rec)
            else:
                first[key] = rec
                kept.append(rec)
    clusters_out: list[dict[str, Any]] = []
    for members in sorted(exact_groups.values(), key=len, reverse=True)[: opts.top_clusters]:
        clusters_out.append({"kind": "exact", "size": len(members), "kept": members[0].id,
                             "members": [m.id for m in members[:20]], "kept_text": _preview(members[0], opts.exact),
                             "example": _preview(members[1], opts.exact), "similarity": 1.0})
    stats: dict[str, Any] = {"exact_duplicates": len(removed), "near_duplicates": 0}
    if opts.near and len(kept) > 1:
        docs = ["\n".join(texts(r, opts.near_text)) for r in kept]
        nd = near_duplicate_clusters(docs, opts.ngram, opts.threshold, opts.num_perm, seed=(ctx.seed if ctx else 0) + 1)
        survivors = []
        for i, rec in enumerate(kept):
            root = int(nd.root[i])
            if root == i:
                survivors.append(rec)
            else:
                removed.append(removal(rec, "near_duplicate",
                                       f"estimated Jaccard {nd.similarity[i]:.2f} with {kept[root].id} (kept)"))
        clusters = nd.clusters()
        stats.update(near_duplicates=len(kept) - len(survivors), near_clusters=len(clusters),
                     candidate_pairs=nd.candidates, lsh_bands=nd.bands, lsh_rows=nd.rows)
        for members in clusters[: opts.top_clusters]:
            clusters_out.append({"kind": "near", "size": len(members), "kept": kept[members[0]].id,
                                 "members": [kept[m].id for m in members[:20]],
                                 "kept_text": _preview(kept[members[0]], opts.near_text),
                                 "example": _preview(kept[members[1]], opts.near_text),
                                 "similarity": round(float(nd.similarity[members[1]]), 3)})
        kept = survivors
    # near clusters first among equal sizes: exact copies are self-explanatory, near ones need a look
    stats["top_clusters"] = sorted(clusters_out, key=lambda c: (-c["size"], c["kind"] != "near"))[: opts.top_clusters]
    return StepResult(kept, removed, stats=stats)
