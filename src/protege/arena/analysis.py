"""What the votes say beyond the leaderboard: pairwise win rates, categories, the LLM judge's agreement
with people, and raters whose votes look random.

- Judge agreement: on every (prompt, model pair) that both people and an `eval judge` pairwise run
  rated, the human verdict (majority of votes; ties and "both bad" as tie) is compared with the judge's
  (its two orders combined). Raw agreement leaves out pairs where either side is a tie; Cohen's kappa
  uses all three outcomes.
- Random raters (FastChat's idea, as a permutation test): a rater's decisive votes are scored by their
  log-likelihood under the Bradley-Terry fit of everyone else's votes, against 1,000 coin-flip
  versions of the same battles. A rater whose votes are not significantly more likely than coin flips
  (p = share of coin versions at least as likely > 0.05) is flagged with that p-value; nothing is dropped.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..evaluate.judge import JUDGE_RESULTS_FILE, JUDGMENTS_FILE
from ..files import jsonl_rows
from .ratings import Vote, bradley_terry, leaderboard, win_matrix

__all__ = ["win_rate_matrix", "by_category", "judge_agreement", "random_raters"]


def win_rate_matrix(votes: list[Vote]) -> dict[str, dict[str, float | None]]:
    models = sorted({v.model_a for v in votes} | {v.model_b for v in votes})
    w = win_matrix(votes, models)
    games = w + w.T
    return {a: {b: (float(w[i, j] / games[i, j]) if games[i, j] else None) for j, b in enumerate(models) if b != a}
            for i, a in enumerate(models)}


def by_category(rows: list[dict[str, Any]], rounds: int = 50) -> dict[str, list[dict]]:
    """Leaderboard per prompt category (rows from `ArenaDB.votes()`)."""
    groups: dict[str, list[Vote]] = defaultdict(list)
    side = {"left": "a", "right": "b", "tie": "tie", "bad": "bad"}
    for r in rows:
        groups[r.get("category") or "(none)"].append(Vote(r["model_left"], r["model_right"], side[r["winner"]]))
    return {c: leaderboard(v, rounds=rounds) for c, v in sorted(groups.items())}


def _human_verdicts(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], str]:
    """(prompt, model x, model y) with x < y -> "x" / "y" / "tie" by majority (ties and both-bad = tie)."""
    tallies: dict[tuple[str, str, str], Counter] = defaultdict(Counter)
    for r in rows:
        a, b = r["model_left"], r["model_right"]
        x, y = sorted((a, b))
        winner = {"left": a, "right": b}.get(r["winner"], "tie")
        tallies[(r["prompt_id"], x, y)][winner if winner == "tie" else ("x" if winner == x else "y")] += 1
    out = {}
    for key, c in tallies.items():
        top = c.most_common()
        out[key] = "tie" if len(top) > 1 and top[0][1] == top[1][1] else top[0][0]
    return out


def _judge_verdicts(judge_dir: str | Path) -> dict[tuple[str, str, str], str]:
    d = Path(judge_dir)
    results = json.loads((d / JUDGE_RESULTS_FILE).read_text(encoding="utf-8"))
    m1, m2 = results["models"][:2]
    x, y = sorted((m1, m2))
    out = {}
    for _, row in jsonl_rows(d / JUDGMENTS_FILE, allow_nan=True):  # protege's own output
        outcome = row.get("outcome")
        if outcome not in ("win", "loss", "tie"):
            continue  # the judge gave no usable verdict
        winner = {"win": m1, "loss": m2}.get(outcome)
        out[(str(row["id"]), x, y)] = "tie" if winner is None else ("x" if winner == x else "y")
    return out


def judge_agreement(rows: list[dict[str, Any]], judge_dirs: list[str]) -> dict[str, Any]:
    human = _human_verdicts(rows)
    judge: dict[tuple[str, str, str], str] = {}
    for d in judge_dirs:
        judge.update(_judge_verdicts(d))
    both = [(human[k], judge[k]) for k in human if k in judge]
    decisive = [(h, j) for h, j in both if h != "tie" and j != "tie"]
    labels = ("x", "y", "tie")
    kappa = None
    if both:
        po = sum(h == j for h, j in both) / len(both)
        ph, pj = Counter(h for h, _ in both), Counter(j for _, j in both)
        pe = sum(ph[c] * pj[c] for c in labels) / len(both) ** 2
        kappa = None if pe == 1 else (po - pe) / (1 - pe)
    return {"pairs": len(both), "decisive_pairs": len(decisive),
            "agreement_without_ties": (sum(h == j for h, j in decisive) / len(decisive)) if decisive else None,
            "cohen_kappa": kappa}


def random_raters(rows: list[dict[str, Any]], min_votes: int = 10, draws: int = 1000, seed: int = 0,
                  alpha: float = 0.05) -> list[dict]:
    """Raters whose decisive votes are no more likely under the others' BT fit than coin flips."""
    rng = np.random.default_rng(seed)
    by_rater: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["winner"] in ("left", "right"):
            by_rater[r["rater_id"]].append(r)
    flagged = []
    for rater, mine in by_rater.items():
        if len(mine) < min_votes:
            continue
        others = [Vote(r["model_left"], r["model_right"], {"left": "a", "right": "b"}[r["winner"]])
                  for r in rows if r["rater_id"] != rater and r["winner"] in ("left", "right")]
        models = sorted({v.model_a for v in others} | {v.model_b for v in others})
        index = {m: i for i, m in enumerate(models)}
        usable = [r for r in mine if r["model_left"] in index and r["model_right"] in index]
        if len(usable) < min_votes:
            continue
        ratings = bradley_terry(win_matrix(others, models))
        diff = np.array([(ratings[index[r["model_left"]]] - ratings[index[r["model_right"]]]) for r in usable])
        p_left = 1.0 / (1.0 + 10 ** (-diff / 400.0))
        chose_left = np.array([r["winner"] == "left" for r in usable])
        observed = float(np.log(np.where(chose_left, p_left, 1 - p_left)).sum())
        coins = rng.random((draws, len(usable))) < 0.5
        null = np.log(np.where(coins, p_left, 1 - p_left)).sum(axis=1)
        p = float((null >= observed).mean())
        if p > alpha:
            flagged.append({"rater_id": rater, "votes": len(usable), "p_value": p,
                            "mean_loglik": observed / len(usable), "coin_mean_loglik": float(null.mean()) / len(usable)})
    return flagged


def _fmt(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
