"""Judge calibration: answer pairs whose better answer is known by construction.

Each built-in item (`calibration/judge_calibration.jsonl`) holds a prompt, a correct answer, the same
answer with its facts made wrong, and the same answer in another language. Six corruptions turn it into
pairs (good answer vs a worse one):

    truncated       the answer cut to its first third, mid-sentence
    off_topic       another item's good answer (fluent, correct, about something else)
    wrong_fact      the hand-written wrong version (same length and style, wrong content)
    repetitive      the first sentence repeated until the answer is as long as the good one
    refusal         a polite refusal of a harmless request
    other_language  the same content in French / Spanish / German to an English question

A judge that reads the answers gets these right; one that follows position or length does not. Every
pair is asked in both orders, exactly like real verdicts, so calibration also measures position
consistency. Accuracy counts a tie (the two orders disagree, or the judge says tie) as half: a judge that
always answers "A" scores 0.5 and consistency 0; one that always picks the better answer scores 1.0.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Sequence

__all__ = ["CALIBRATION_FILE", "KINDS", "load_items", "corrupt", "calibration_pairs", "calibration_summary",
           "trust_verdict"]

CALIBRATION_FILE = Path(__file__).parent / "calibration" / "judge_calibration.jsonl"
KINDS = ("truncated", "off_topic", "wrong_fact", "repetitive", "refusal", "other_language")
REFUSAL = ("I'm sorry, but I can't help with that request. If you have another question, I'm happy to try to "
           "help with it.")


def load_items(path: str | Path = CALIBRATION_FILE) -> list[dict[str, Any]]:
    """The calibration items: {"id", "prompt", "good", "wrong_fact", "other_language"} per line."""
    from ..errors import StageError

    from ..files import jsonl_rows

    items = []
    for n, row in jsonl_rows(path):
        missing = [k for k in ("id", "prompt", "good", "wrong_fact", "other_language") if not row.get(k)]
        if missing:
            raise StageError(f"{path}:{n}: calibration item lacks {', '.join(missing)}")
        items.append(row)
    return items


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def corrupt(kind: str, item: dict[str, Any], other: dict[str, Any]) -> str:
    """The worse answer of `kind` for `item` (`other` is a different item, used by off_topic)."""
    good = item["good"]
    if kind == "truncated":
        words = good.split()
        return " ".join(words[: max(3, len(words) // 3)])
    if kind == "off_topic":
        return other["good"]
    if kind == "wrong_fact":
        return item["wrong_fact"]
    if kind == "repetitive":
        first = _sentences(good)[0]
        reps = max(3, round(len(good) / max(len(first) + 1, 1)))
        return " ".join([first] * reps)
    if kind == "refusal":
        return REFUSAL
    if kind == "other_language":
        return item["other_language"]
    raise ValueError(f"unknown calibration kind {kind!r}; expected one of {', '.join(KINDS)}")


def calibration_pairs(n: int, seed: int = 0, items: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """`n` pairs {"id", "kind", "turns", "good", "bad"}, spread evenly over the kinds (deterministic).

    Item i gets kind (i + round) mod 6 in round r, so small n still covers every kind and every item.
    """
    items = list(items if items is not None else load_items())
    if n <= 0 or not items:
        return []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    pairs = []
    for k in range(min(n, len(items) * len(KINDS))):
        rnd, pos = divmod(k, len(items))
        item = items[order[pos]]
        kind = KINDS[(pos + rnd) % len(KINDS)]
        other = items[order[(pos + 1 + rnd) % len(items)]]
        pairs.append({"id": f"{item['id']}/{kind}", "kind": kind, "turns": [item["prompt"]],
                      "good": item["good"], "bad": corrupt(kind, item, other)})
    return pairs


def _score(outcome: str) -> float:
    return {"win": 1.0, "tie": 0.5, "loss": 0.0}[outcome]


def calibration_summary(rows: list[dict[str, Any]], iters: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Accuracy (ties half) with a bootstrap interval, position consistency, per-kind accuracy.

    `rows`: {"kind", "verdicts": [v1, v2], "outcome"} where outcome is the good answer's
    ("win"/"tie"/"loss"/"error"), v1 with the good answer shown first. With `p_good` (log-prob
    verdicts) the mean probability given to the good answer is reported too.
    """
    from .intervals import bootstrap_ci

    ok = [r for r in rows if r["outcome"] != "error"]
    scores = [_score(r["outcome"]) for r in ok]
    flip = {"A": "B", "B": "A", "tie": "tie"}
    ordered = [r for r in ok if r["verdicts"][1] in flip]  # pairwise rows (graded rows have no order)
    out: dict[str, Any] = {
        "n": len(rows), "n_judged": len(ok),
        "accuracy": sum(scores) / len(scores) if scores else float("nan"),
        "accuracy_ci": bootstrap_ci(scores, iters, seed),
        "position_consistency": (sum(r["verdicts"][0] == flip[r["verdicts"][1]] for r in ordered) / len(ordered)
                                 if ordered else None),
        "error_rate": (len(rows) - len(ok)) / len(rows) if rows else float("nan"),
        "by_kind": {},
    }
    for kind in KINDS:
        mine = [_score(r["outcome"]) for r in ok if r["kind"] == kind]
        if mine:
            out["by_kind"][kind] = {"n": len(mine), "accuracy": sum(mine) / len(mine)}
    probs = [r["p_good"] for r in ok if r.get("p_good") is not None]
    if probs:
        out["mean_p_good"] = sum(probs) / len(probs)
    return out


def trust_verdict(summary: dict[str, Any], min_accuracy: float, min_consistency: float | None) -> dict[str, Any]:
    """{"trustworthy": bool, "reasons": [...]}: accuracy and its interval's low end must clear the bars.

    The interval matters: 0.80 on 12 pairs (low end ~0.58) is not evidence of a working judge.
    """
    reasons = []
    acc, (lo, _), cons = summary["accuracy"], summary["accuracy_ci"], summary["position_consistency"]
    if not summary.get("n_judged"):
        reasons.append("no calibration pair was judged")
    else:
        if not acc >= min_accuracy:
            reasons.append(f"calibration accuracy {acc:.2f} < {min_accuracy:.2f}")
        elif not lo > 0.5:
            reasons.append(f"calibration accuracy's 95% interval reaches {lo:.2f} (not clearly above chance)")
        if min_consistency is not None and not cons >= min_consistency:
            reasons.append(f"position consistency {cons:.2f} < {min_consistency:.2f}")
    return {"trustworthy": not reasons, "reasons": reasons, "min_accuracy": min_accuracy,
            "min_position_consistency": min_consistency}
