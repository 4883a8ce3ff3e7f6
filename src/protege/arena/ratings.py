"""Ratings from pairwise human votes: Bradley-Terry maximum likelihood with bootstrap intervals, and Elo.

Bradley-Terry: P(i beats j) = 1 / (1 + 10^((R_j - R_i) / 400)), ratings on Chatbot Arena's Elo-like
scale (anchored so the mean rating is 1000). A tie counts as half a win for each side (FastChat's
`compute_mle_elo` does the same by duplicating battles); "both bad" votes carry no preference and are
left out of the fit (they are counted).

Why not FastChat's code: it fits a logistic regression on one row per battle (sklearn), and each
bootstrap round resamples and refits all rows, ~10 s for 100 rounds. The likelihood depends only on the
win counts per ordered pair, so protege aggregates the battles into an (n_models x n_models) matrix once;
a bootstrap round is one multinomial draw over the pair-outcome cells and a Newton solve on that matrix.
Same estimator, independent of the number of votes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

__all__ = ["Vote", "win_matrix", "bradley_terry", "bootstrap_intervals", "elo", "leaderboard", "SCALE", "INIT"]

SCALE, INIT = 400.0, 1000.0
_LN10 = math.log(10.0)


@dataclass(frozen=True)
class Vote:
    model_a: str
    model_b: str
    winner: str  # "a", "b", "tie", "bad"


def win_matrix(votes: Iterable[Vote], models: list[str]) -> np.ndarray:
    """W[i, j] = wins of i over j, ties as 0.5 to each; "bad" votes are not preferences."""
    index = {m: k for k, m in enumerate(models)}
    w = np.zeros((len(models), len(models)))
    for v in votes:
        i, j = index[v.model_a], index[v.model_b]
        if v.winner == "a":
            w[i, j] += 1
        elif v.winner == "b":
            w[j, i] += 1
        elif v.winner == "tie":
            w[i, j] += 0.5
            w[j, i] += 0.5
    return w


def bradley_terry(w: np.ndarray, iters: int = 100, tol: float = 1e-10, prior: float = 1e-6) -> np.ndarray:
    """Maximum-likelihood BT ratings (Elo scale, mean INIT) from a win matrix, by Newton's method.

    `prior` is a tiny ridge on the log-strengths so a model that never lost (or never won) gets a
    finite rating instead of running to infinity; it changes well-determined ratings negligibly.
    """
    n = w.shape[0]
    games = w + w.T
    theta = np.zeros(n)
    for _ in range(iters):
        diff = theta[:, None] - theta[None, :]
        p = 1.0 / (1.0 + np.exp(-diff))  # P(i beats j), natural-log scale
        grad = (w - games * p).sum(axis=1) - prior * theta
        h = games * p * (1 - p)
        # Negative Hessian: graph Laplacian of the games + the ridge, positive definite.
        hess = np.diag(h.sum(axis=1) + prior) - h
        step = np.linalg.lstsq(hess, grad, rcond=None)[0] if n > 1 else grad / (h.sum() + prior)
        theta = theta + step
        theta -= theta.mean()
        if np.abs(step).max() < tol:
            break
    return INIT + SCALE * theta / _LN10


def bootstrap_intervals(votes: list[Vote], models: list[str], rounds: int = 100, seed: int = 0,
                        level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) of each model's BT rating over `rounds` bootstrap resamples of the battles."""
    index = {m: k for k, m in enumerate(models)}
    cells: dict[tuple[int, int, str], int] = {}
    for v in votes:
        key = (index[v.model_a], index[v.model_b], v.winner)
        cells[key] = cells.get(key, 0) + 1
    keys = list(cells)
    counts = np.array([cells[k] for k in keys], dtype=float)
    total = int(counts.sum())
    rng = np.random.default_rng(seed)
    samples = np.empty((rounds, len(models)))
    n = len(models)
    for r in range(rounds):
        draw = rng.multinomial(total, counts / total) if total else counts
        w = np.zeros((n, n))
        for (i, j, outcome), c in zip(keys, draw):
            if outcome == "a":
                w[i, j] += c
            elif outcome == "b":
                w[j, i] += c
            elif outcome == "tie":
                w[i, j] += 0.5 * c
                w[j, i] += 0.5 * c
        samples[r] = bradley_terry(w)
    alpha = (1 - level) / 2
    return np.quantile(samples, alpha, axis=0), np.quantile(samples, 1 - alpha, axis=0)


def elo(votes: Iterable[Vote], models: list[str], k: float = 4.0) -> np.ndarray:
    """Online Elo in vote order (K=4, as Chatbot Arena): order-dependent, shown beside BT."""
    index = {m: i for i, m in enumerate(models)}
    r = np.full(len(models), INIT)
    for v in votes:
        if v.winner == "bad":
            continue
        i, j = index[v.model_a], index[v.model_b]
        expected = 1.0 / (1.0 + 10 ** ((r[j] - r[i]) / SCALE))
        score = {"a": 1.0, "b": 0.0, "tie": 0.5}[v.winner]
        r[i] += k * (score - expected)
        r[j] -= k * (score - expected)
    return r


def leaderboard(votes: list[Vote], rounds: int = 100, seed: int = 0) -> list[dict]:
    """One row per model, best first: BT rating with its 95% interval, Elo, battles, win rate."""
    models = sorted({v.model_a for v in votes} | {v.model_b for v in votes})
    if not models:
        return []
    w = win_matrix(votes, models)
    bt = bradley_terry(w)
    lo, hi = bootstrap_intervals(votes, models, rounds, seed)
    online = elo(votes, models)
    games = (w + w.T).sum(axis=1)
    battles = {m: 0 for m in models}
    for v in votes:
        battles[v.model_a] += 1
        battles[v.model_b] += 1
    rows = [{"model": m, "rating": float(bt[k]), "ci_low": float(lo[k]), "ci_high": float(hi[k]),
             "elo": float(online[k]), "battles": battles[m],
             "win_rate": float(w[k].sum() / games[k]) if games[k] else None} for k, m in enumerate(models)]
    return sorted(rows, key=lambda r: -r["rating"])
