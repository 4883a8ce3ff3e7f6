"""`mix`: combine sources with weights, caps and epochs, deterministically from the run seed.

Per source (the record's `source` field): shuffle with the seed, take `cap` records, or
`total * weight / sum(weights)` when a total is set, then repeat `epochs` times (1.5 = all
once plus a seeded half again). Records not taken are removed (`mix_cap`); repeats are new
records `<id>~r<k>` with `meta.repeat_of`, counted as added.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

from ..errors import StageError
from ..records import Comparison, Conversation, Record
from .common import Context, StepResult, log, removal
from .config import MixStep, SourceMix

__all__ = ["apply"]


def _copy(rec: Record, k: int) -> Record:
    meta = {**rec.meta, "repeat_of": rec.id}
    if isinstance(rec, Comparison):
        return Comparison(rec.prompt, rec.chosen, rec.rejected, rec.margin, f"{rec.id}~r{k}", rec.source, meta)
    return Conversation(rec.messages, f"{rec.id}~r{k}", rec.source, meta)


def apply(records: list[Record], opts: MixStep, ctx: Context | None = None) -> StepResult:
    """Select and repeat records per source; stats give in/out counts per source."""
    seed = ctx.seed if ctx is not None else 0
    by_source: dict[str, list[Record]] = defaultdict(list)
    for rec in records:
        by_source[rec.source].append(rec)
    weights = {s: m.weight for s, m in opts.sources.items() if m.weight is not None}
    if weights and opts.total is None:
        raise StageError("mix: `weight` needs `total` (the size the weights share)")
    weight_sum = sum(weights.values()) or 1.0
    out, removed, added, per_source = [], [], 0, {}
    for source in sorted(by_source):
        recs = by_source[source]
        spec = opts.sources.get(source)
        if spec is None:
            if opts.unlisted == "drop":
                removed += [removal(r, "mix_unlisted", f"source {source!r} not in mix.sources") for r in recs]
                per_source[source] = {"in": len(recs), "out": 0}
                continue
            spec = SourceMix()
        rng = random.Random(f"{seed}:{source}")
        order = list(recs)
        rng.shuffle(order)
        base_n = len(order) if spec.cap is None else min(len(order), spec.cap)
        if spec.weight is not None:   # a weight fixes the final count; repeats fill it if the source is small
            target = int(round(opts.total * spec.weight / weight_sum))
        else:
            target = int(round(base_n * spec.epochs))
        base = order[: min(base_n, target)]
        taken = {id(r) for r in base}
        removed += [removal(r, "mix_cap", f"source {source!r} capped at {len(base)} of {len(recs)}")
                    for r in recs if id(r) not in taken]
        chosen = list(base)
        k = 1
        while len(chosen) < target and base:          # repeats: whole passes, then a seeded partial one
            extra = base[: target - len(chosen)] if len(base) <= target - len(chosen) else rng.sample(base, target - len(chosen))
            chosen += [_copy(r, k) for r in extra]
            added += len(extra)
            k += 1
        out += chosen
        per_source[source] = {"in": len(recs), "out": len(chosen)}
    if opts.shuffle:
        random.Random(seed).shuffle(out)
    stats: dict[str, Any] = {"mix": per_source}
    unmatched = sorted(set(opts.sources) - set(by_source))
    if unmatched:  # a cap on a misspelt source (or on a file's name) silently does nothing: say so
        stats["unmatched_sources"] = unmatched
        log(f"warning: mix.sources {unmatched} match no record; sources present: {sorted(by_source)} "
            "(records are named by their `source` field: data.convert's `source:` sets it)")
    return StepResult(out, removed, added=added, stats=stats)
