"""What a judge is asked and how its replies become verdicts: MT-bench-style prompts (pairwise, single,
reference-guided), parsing generated verdicts and ratings, combining the two orders of a pair, and the
win/tie/loss summary with its intervals and bias measures. `judge.py` runs them; `generate pairs` labels with them."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Sequence

from .intervals import bootstrap_ci

if TYPE_CHECKING:
    from ..teachers import Teacher

__all__ = ["VERDICT_PREFIX", "VERDICT_OPTIONS", "verdict_probs", "p_first", "order_outcome", "JUDGE_SYSTEM", "pairwise_messages", "single_messages", "parse_pairwise", "parse_rating",
           "combine_orders", "pairwise_summary"]


JUDGE_SYSTEM = ("You are a strict, impartial judge of AI assistant answers. You judge helpfulness, correctness, "
                "relevance and clarity. Length is not quality: a short correct answer beats a long wrong one. "
                "The order in which answers are shown must not influence you.")


def _dialogue(turns: Sequence[str], answers: Sequence[str], label: str) -> str:
    if len(turns) == 1:
        return f"[Answer {label}]\n{answers[0]}\n[End of answer {label}]"
    parts = []
    for i, (q, a) in enumerate(zip(turns, answers), 1):
        parts.append(f"User (turn {i}): {q}\nAssistant {label} (turn {i}): {a}")
    return f"[Conversation with assistant {label}]\n" + "\n\n".join(parts) + f"\n[End of conversation {label}]"


def _question(turns: Sequence[str]) -> str:
    return turns[0] if len(turns) == 1 else "\n".join(f"Turn {i}: {t}" for i, t in enumerate(turns, 1))


def _reference(reference: Sequence[str] | None) -> str:
    if not reference:
        return ""
    return "[Reference answer]\n" + "\n".join(r for r in reference if r) + "\n[End of reference answer]\n\n"


def pairwise_messages(turns: Sequence[str], first: Sequence[str], second: Sequence[str],
                      reference: Sequence[str] | None = None) -> list[dict[str, str]]:
    """The judge conversation comparing `first` (shown as A) with `second` (shown as B)."""
    user = (f"[Question]\n{_question(turns)}\n[End of question]\n\n{_reference(reference)}"
            f"{_dialogue(turns, first, 'A')}\n\n{_dialogue(turns, second, 'B')}\n\n"
            "Which answer is better? Begin your reply with exactly one line: `Verdict: A`, `Verdict: B` "
            "or `Verdict: tie`. Then give one or two sentences of reasons.")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def single_messages(turns: Sequence[str], answers: Sequence[str],
                    reference: Sequence[str] | None = None, turn: int | None = None) -> list[dict[str, str]]:
    """The judge conversation grading one answer (against `reference` when given). `turn` (1-based, MT-bench's
    per-turn grading): the dialogue up to that turn is shown and only the answer in that turn is graded."""
    against = "Compare it with the reference answer, which is correct. " if reference else ""
    what = "answer A"
    if turn is not None and len(turns) > 1:
        turns, answers = turns[:turn], answers[:turn]
        reference = reference[:turn] if reference else reference
        what = f"assistant A's answer in turn {turn} (the earlier turns are context)"
    user = (f"[Question]\n{_question(turns)}\n[End of question]\n\n{_reference(reference)}"
            f"{_dialogue(turns, answers, 'A')}\n\nRate {what} from 1 (useless or wrong) to 10 (excellent). "
            f"{against}Begin your reply with exactly one line: `Rating: N` where N is a whole number from 1 "
            "to 10. Then give one or two sentences of reasons.")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


_VERDICT = [
    re.compile(r"verdict\s*[:=\-]?\s*[\*\[\(\"'`]*\s*(?:answer\s+|assistant\s+)?(A|B|tie)\b", re.IGNORECASE),
    re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE),
    re.compile(r"\b(?:answer|assistant|response)\s+(A|B)\s+is\s+(?:better|superior|preferred|more)", re.IGNORECASE),
    re.compile(r"\b(?:both answers are (?:equally|equal)|it'?s a tie|(?:they|both) are (?:tied|equal))()",
               re.IGNORECASE),
    # The reply *begins* with the bare verdict, as the prompt asks ("A", "B: ...", "tie."); a weak judge
    # often drops the "Verdict:" word. Only at the very start, so "A good answer..." does not count.
    re.compile(r"\A\s*[\*\[\(]*\s*(A|B|tie)\s*[\]\)\*]*\s*(?:[:.,\n]|\Z)", re.IGNORECASE),
]


def parse_pairwise(text: str) -> str | None:
    """"A", "B" or "tie" from a judge reply, or None when the reply has no usable verdict."""
    for pat in _VERDICT:
        m = pat.search(text or "")
        if m:
            v = m.group(1).upper() if m.group(1) else "TIE"
            return {"A": "A", "B": "B", "C": "tie", "TIE": "tie"}[v]
    return None


_RATING = [re.compile(r"rating\s*[:=\-]?\s*[\*\[\(]*\s*(\d+(?:\.\d+)?)", re.IGNORECASE),
           re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]"),
           re.compile(r"\b(\d+(?:\.\d+)?)\s*(?:/|out of)\s*10\b", re.IGNORECASE)]


def parse_rating(text: str) -> float | None:
    """A 1-10 rating from a judge reply, or None (no rating, or outside 1..10)."""
    for pat in _RATING:
        m = pat.search(text or "")
        if m:
            value = float(m.group(1))
            return value if 1 <= value <= 10 else None
    return None


def combine_orders(first_order: str | None, second_order: str | None) -> str:
    """Outcome for model 1 from the verdicts of both orders.

    `first_order` is the verdict with model 1 shown as A; `second_order` with model 1 shown as B.
    Returns "win" / "loss" / "tie" (model 1's view), or "error" if either verdict is missing.
    Orders that disagree (the judge followed the position, not the content) count as a tie.
    """
    if first_order is None or second_order is None:
        return "error"
    as_model1 = {"A": "win", "B": "loss", "tie": "tie"}[first_order]
    swapped = {"A": "loss", "B": "win", "tie": "tie"}[second_order]
    return as_model1 if as_model1 == swapped else "tie"


VERDICT_PREFIX = "Verdict:"
VERDICT_OPTIONS = (" A", " B", " tie")


def verdict_probs(teacher: Teacher, convs: list[list[dict[str, str]]], progress: bool = True) -> list[dict[str, float]]:
    """{"A", "B", "tie"} probabilities of each pairwise conversation's verdict, read from the judge's next-token
    distribution after "Verdict:" (a local judge: `teacher.scores_choices`); never unparseable."""
    return [dict(zip(("A", "B", "tie"), probs))
            for probs in teacher.choice_probs(convs, VERDICT_PREFIX, list(VERDICT_OPTIONS), progress=progress)]


def p_first(p1: dict[str, float] | None, p2: dict[str, float] | None) -> float | None:
    """Probability that the model shown first in order 1 is better, averaged over both orders (ties half)."""
    if p1 is None or p2 is None:
        return None
    return 0.5 * ((p1["A"] + 0.5 * p1["tie"]) + (p2["B"] + 0.5 * p2["tie"]))


def order_outcome(v1: str | None, v2: str | None, p: float | None, margin: float) -> str:
    """The pair's outcome for the model shown first in order 1.

    Generated verdicts: the two orders must agree (else a tie). Log-prob verdicts (`p` from `p_first`): the
    probability that it is better, averaged over both orders, decides (win above 0.5 + margin, loss below
    0.5 - margin): averaging over the two positions cancels a constant position bias ("balanced position
    calibration", Wang et al. 2023), which the agree-or-tie rule would turn into all ties.
    """
    if p is None:
        return combine_orders(v1, v2)
    return "win" if p > 0.5 + margin else "loss" if p < 0.5 - margin else "tie"


def pairwise_summary(rows: list[dict[str, Any]], iters: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Win/tie/loss rates with bootstrap intervals and the judge's bias figures from judgments."""
    ok = [r for r in rows if r["outcome"] != "error"]
    n = len(ok)
    out: dict[str, Any] = {"n": len(rows), "n_judged": n,
                           "error_rate": (len(rows) - n) / len(rows) if rows else float("nan")}
    for outcome in ("win", "tie", "loss"):
        vals = [float(r["outcome"] == outcome) for r in ok]
        out[outcome] = sum(vals) / n if n else float("nan")
        out[f"{outcome}_ci"] = bootstrap_ci(vals, iters, seed)
    score = [1.0 if r["outcome"] == "win" else 0.5 if r["outcome"] == "tie" else 0.0 for r in ok]
    out["win_rate"] = sum(score) / n if n else float("nan")  # ties count half
    out["win_rate_ci"] = bootstrap_ci(score, iters, seed)
    out["position_consistency"] = (sum(r["verdicts"][0] == {"A": "B", "B": "A", "tie": "tie"}[r["verdicts"][1]]
                                       for r in ok) / n) if n else float("nan")
    # Per-order verdicts that picked a side: which position, and was the winner the longer answer?
    decisive = [(v, r) for r in rows for k, v in enumerate(r["verdicts"]) if v in ("A", "B")]
    out["first_position_rate"] = (sum(v == "A" for v, _ in decisive) / len(decisive)) if decisive else float("nan")
    longer = []
    for r in rows:
        la, lb = r["length"]  # characters of model 1's and model 2's answers
        if la == lb:
            continue
        for k, v in enumerate(r["verdicts"]):
            if v in ("A", "B"):
                winner_is_model1 = (v == "A") == (k == 0)
                longer.append(float(winner_is_model1 == (la > lb)))
    out["length_bias"] = sum(longer) / len(longer) if longer else float("nan")
    out["length_bias_n"] = len(longer)
    # The win rate at equal length (AlpacaEval 2's length-controlled GLM): a log-prob judge's probability is the
    # soft target where there is one, else the outcome (ties half).
    from .length_control import lc_win_rate

    soft = [r["p_win"] if r.get("p_win") is not None else s for r, s in zip(ok, score)]
    out.update(lc_win_rate(soft, [r["length"][0] for r in ok], [r["length"][1] for r in ok], iters, seed))
    # What the LC rate is to be compared with: the mean of the same targets, without the length term. A log-prob
    # judge's probabilities are less extreme than its verdicts, so `win_rate` (verdicts) is not that baseline.
    out["lc_raw_win_rate"] = sum(soft) / len(soft) if soft else float("nan")
    return out


# ---- the stage ---------------------------------------------------------------------------------
