"""Chinchilla's IsoFLOP analysis (Hoffmann et al. 2022, "Approach 2"), as pure functions.

Input: training runs, each (C, N, D, loss) — compute budget, parameters, tokens, final held-out loss —
several model sizes per budget, every run of a budget spending that budget.

1. Per budget, fit a parabola to loss against log N (on the `window` sizes around the lowest loss: a
   parabola is only a local model of the curve); its vertex is the loss-optimal size N_opt(C). A
   vertex outside the sizes tried (or a parabola that opens downward) has no interior minimum: it is
   reported as such and left out of the law, not extrapolated.
2. D_opt(C): log D is interpolated at log N_opt along the budget's own runs (D = C / FLOPs-per-token,
   which for small models is not 6N, so D is read from the runs rather than from C / 6N).
3. Fit log N_opt = a log C + k_N and log D_opt = b log C + k_D by least squares; report a, b and the
   tokens per parameter D_opt / N_opt at each budget. Chinchilla found a ≈ b ≈ 0.5 and ~20 tokens/param.

Intervals come from a residual bootstrap: each budget's parabola residuals are resampled onto its fitted
values, the whole analysis is refitted, and the 2.5/97.5 percentiles are reported. (Resampling runs
themselves would leave three-point budgets with degenerate parabolas.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = ["Run", "BudgetFit", "ScalingFit", "fit_budget", "fit_isoflop", "bootstrap", "synthetic_runs"]


@dataclass(frozen=True)
class Run:
    flops: float  # C
    params: float  # N
    tokens: float  # D
    loss: float


@dataclass
class BudgetFit:
    flops: float
    coeffs: tuple[float, float, float]  # loss = c2 x^2 + c1 x + c0, x = ln N
    n_opt: float | None  # None: no interior minimum
    d_opt: float | None
    loss_opt: float | None
    interior: bool
    sizes: tuple[float, float]  # smallest and largest N tried

    def to_json(self) -> dict[str, Any]:
        return {"flops": self.flops, "n_opt": self.n_opt, "d_opt": self.d_opt, "loss_opt": self.loss_opt,
                "interior": self.interior, "tokens_per_param": (self.d_opt / self.n_opt) if self.n_opt else None,
                "parabola": list(self.coeffs), "sizes_tried": list(self.sizes)}


@dataclass
class ScalingFit:
    budgets: list[BudgetFit]
    a: float | None  # N_opt ∝ C^a
    b: float | None  # D_opt ∝ C^b
    k_n: float | None
    k_d: float | None
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    bootstrap_kept: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "k_n": self.k_n, "k_d": self.k_d,
                "intervals": {k: list(v) for k, v in self.intervals.items()}, "bootstrap_kept": self.bootstrap_kept,
                "budgets": [b.to_json() for b in self.budgets]}


def fit_budget(runs: Sequence[Run], window: int = 5) -> BudgetFit:
    """The parabola in ln N through one budget's runs, and its vertex when it lies inside the sizes tried."""
    runs = sorted(runs, key=lambda r: r.params)
    if len(runs) > window:  # the parabola is a local model: fit it on the sizes around the observed minimum
        best = min(range(len(runs)), key=lambda i: runs[i].loss)
        lo = max(0, min(best - window // 2, len(runs) - window))
        runs = runs[lo:lo + window]
    x = np.log([r.params for r in runs])
    y = np.array([r.loss for r in runs])
    c2, c1, c0 = np.polyfit(x, y, 2) if len(runs) >= 3 else (0.0, 0.0, float(y.mean()))
    flops = float(np.median([r.flops for r in runs]))
    sizes = (float(runs[0].params), float(runs[-1].params))
    if c2 <= 0:
        return BudgetFit(flops, (float(c2), float(c1), float(c0)), None, None, None, False, sizes)
    xv = -c1 / (2 * c2)
    interior = bool(x[0] < xv < x[-1])
    if not interior:
        return BudgetFit(flops, (float(c2), float(c1), float(c0)), None, None, None, False, sizes)
    log_d = np.interp(xv, x, np.log([r.tokens for r in runs]))
    return BudgetFit(flops, (float(c2), float(c1), float(c0)), float(math.exp(xv)), float(math.exp(log_d)),
                     float(c2 * xv * xv + c1 * xv + c0), True, sizes)


def _group(runs: Sequence[Run], rel: float = 0.02) -> list[list[Run]]:
    """Runs grouped by budget (budgets within 2% are one: a run's steps round its FLOPs)."""
    groups: list[list[Run]] = []
    for r in sorted(runs, key=lambda r: r.flops):
        if groups and abs(r.flops / groups[-1][0].flops - 1) <= rel:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _power_law(cs: list[float], ys: list[float]) -> tuple[float, float] | tuple[None, None]:
    if len(cs) < 2:
        return None, None
    slope, intercept = np.polyfit(np.log(cs), np.log(ys), 1)
    return float(slope), float(intercept)


def fit_isoflop(runs: Sequence[Run]) -> ScalingFit:
    """Per-budget parabolas, then the power laws of N_opt and D_opt in C (point estimates)."""
    budgets = [fit_budget(g) for g in _group(runs)]
    ok = [b for b in budgets if b.interior]
    a, k_n = _power_law([b.flops for b in ok], [b.n_opt for b in ok])  # type: ignore[misc]
    b_, k_d = _power_law([b.flops for b in ok], [b.d_opt for b in ok])  # type: ignore[misc]
    return ScalingFit(budgets, a, b_, k_n, k_d)


def bootstrap(runs: Sequence[Run], n: int = 1000, seed: int = 0, level: float = 0.95) -> ScalingFit:
    """`fit_isoflop` with residual-bootstrap intervals for a, b and each budget's N_opt and tokens/param."""
    point = fit_isoflop(runs)
    if n <= 0:
        return point
    rng = np.random.default_rng(seed)
    groups = _group(runs)
    fitted = []
    for g, bf in zip(groups, point.budgets):
        g = sorted(g, key=lambda r: r.params)
        x = np.log([r.params for r in g])
        pred = np.polyval(bf.coeffs, x)
        fitted.append((g, pred, np.array([r.loss for r in g]) - pred))
    samples: dict[str, list[float]] = {"a": [], "b": []}
    for _ in range(n):
        resampled = []
        for g, pred, resid in fitted:
            noise = rng.choice(resid, size=len(g), replace=True) if len(g) > 3 else np.zeros(len(g))
            resampled += [Run(r.flops, r.params, r.tokens, float(p + e)) for r, p, e in zip(g, pred, noise)]
        f = fit_isoflop(resampled)
        if f.a is None or len([b for b in f.budgets if b.interior]) < len([b for b in point.budgets if b.interior]):
            continue  # a resample that lost an interior minimum: counted as dropped, not as a number
        samples["a"].append(f.a)
        samples["b"].append(f.b)  # type: ignore[arg-type]
        for i, bf in enumerate(f.budgets):
            if bf.interior:
                samples.setdefault(f"n_opt[{i}]", []).append(bf.n_opt)  # type: ignore[arg-type]
                samples.setdefault(f"tokens_per_param[{i}]", []).append(bf.d_opt / bf.n_opt)  # type: ignore[operator]
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    point.intervals = {k: (float(np.percentile(v, lo)), float(np.percentile(v, hi))) for k, v in samples.items() if v}
    point.bootstrap_kept = len(samples["a"])
    return point


def synthetic_runs(budgets: Sequence[float], alpha: float, beta: float, E: float = 1.69, A: float = 406.4,
                   B: float = 410.7, sizes_per_budget: int = 7, spread: float = 8.0, noise: float = 0.0,
                   seed: int = 0) -> list[Run]:
    """Runs whose loss follows L = E + A/N^alpha + B/D^beta with C = 6ND (Chinchilla's Approach 3 form; the
    defaults are its fitted constants), N spaced log-evenly over `spread`x either side of the optimum."""
    rng = np.random.default_rng(seed)
    g = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    runs = []
    for c in budgets:
        n_star = g * (c / 6) ** (beta / (alpha + beta))
        for n in np.geomspace(n_star / spread, n_star * spread, sizes_per_budget):
            d = c / (6 * n)
            loss = E + A / n ** alpha + B / d ** beta + (rng.normal(0, noise) if noise else 0.0)
            runs.append(Run(float(c), float(n), float(d), float(loss)))
    return runs
