"""Bootstrap 95% intervals: one mean, a mean over tasks (items resampled within each task), and a
paired difference between two models scored on the same items (the same resampled items for both,
so item difficulty cancels and the interval is as narrow as the data allow)."""

from __future__ import annotations

import random
from typing import Mapping, Sequence

__all__ = ["bootstrap_ci", "task_mean", "stratified_ci", "paired_diff", "ratio_ci", "paired_ratio_diff"]

Items = Mapping[str, Mapping[str, float]]  # task -> item id -> score


def _pct(stats: list[float]) -> tuple[float, float]:
    stats = sorted(stats)
    k = len(stats) - 1
    return (stats[int(0.025 * k)], stats[int(0.975 * k)])


def bootstrap_ci(values: Sequence[float], iters: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of `values` (resampling items with replacement)."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(values)
    return _pct([sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(iters)])


def task_mean(items: Items) -> float:
    """Mean over tasks of each task's mean item score (every task weighs the same, as in the report)."""
    means = [sum(v.values()) / len(v) for v in items.values() if v]
    return sum(means) / len(means) if means else float("nan")


def stratified_ci(items: Items, iters: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Interval of `task_mean`, resampling items within each task."""
    rng = random.Random(seed)
    cols = [list(v.values()) for v in items.values() if v]
    if not cols:
        return (float("nan"), float("nan"))
    stats = []
    for _ in range(iters):
        stats.append(sum(sum(c[rng.randrange(len(c))] for _ in c) / len(c) for c in cols) / len(cols))
    return _pct(stats)


def paired_diff(a: Items, b: Items, iters: int = 1000, seed: int = 0) -> dict[str, float] | None:
    """`task_mean(a) - task_mean(b)` over the tasks and items both have, with a paired interval.

    Returns {"diff", "lo", "hi", "tasks", "items"} or None when they share no scored item.
    """
    shared = {t: [i for i in a[t] if i in b[t]] for t in a if t in b}
    shared = {t: ids for t, ids in shared.items() if ids}
    if not shared:
        return None
    diffs = [[a[t][i] - b[t][i] for i in ids] for t, ids in shared.items()]
    point = sum(sum(d) / len(d) for d in diffs) / len(diffs)
    rng = random.Random(seed)
    stats = [sum(sum(d[rng.randrange(len(d))] for _ in d) / len(d) for d in diffs) / len(diffs) for _ in range(iters)]
    lo, hi = _pct(stats)
    return {"diff": point, "lo": lo, "hi": hi, "tasks": len(shared), "items": sum(map(len, diffs))}


def ratio_ci(pairs: Sequence[Sequence[float]], iters: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Interval of `sum(num) / sum(den)` over `[num, den]` pairs (e.g. NLL sums and token counts),
    resampling the pairs: a token-weighted mean whose units are whole answers."""
    if not pairs:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(pairs)
    stats = []
    for _ in range(iters):
        draw = [pairs[rng.randrange(n)] for _ in range(n)]
        stats.append(sum(d[0] for d in draw) / sum(d[1] for d in draw))
    return _pct(stats)


def paired_ratio_diff(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], iters: int = 1000,
                      seed: int = 0) -> dict[str, float] | None:
    """Difference of token-weighted means, `sum(a)/tokens(a) - sum(b)/tokens(b)`, over shared ids
    (`{id: [sum, tokens]}`), with a paired bootstrap interval (the same ids resampled for both)."""
    ids = [i for i in a if i in b]
    if not ids:
        return None

    def diff(pick: Sequence[str]) -> float:
        return (sum(a[i][0] for i in pick) / sum(a[i][1] for i in pick)
                - sum(b[i][0] for i in pick) / sum(b[i][1] for i in pick))

    rng = random.Random(seed)
    lo, hi = _pct([diff([ids[rng.randrange(len(ids))] for _ in ids]) for _ in range(iters)])
    return {"diff": diff(ids), "lo": lo, "hi": hi, "items": len(ids)}
