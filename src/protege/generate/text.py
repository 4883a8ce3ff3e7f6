"""Text checks shared by the generators: ROUGE-L near-duplicate pool, degenerate repetition.

ROUGE-L is computed here rather than with `rouge-score` because the Self-Instruct
filter compares every candidate against the *whole* growing pool (seeds + every kept
task): `rouge-score` re-tokenizes both sides on every call, while `RougePool`
tokenizes each pool entry once and skips most pairs with two cheap upper bounds on
the LCS (length ratio, bag-of-words overlap) before running the O(m·n) dynamic
program. Tokenization matches rouge-score's default (lower-case, split on non
alphanumerics, no stemming: what the Self-Instruct paper used); the test suite checks
parity with `rouge_score.rouge_scorer` on many pairs.
"""

from __future__ import annotations

import re
from collections import Counter

__all__ = ["rouge_tokens", "lcs_length", "rouge_l", "RougePool", "repetition_ratio", "is_degenerate"]

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenizer: lower-case, non-alphanumerics are separators."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (one-row dynamic program, O(len(a)·len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _f(lcs: int, la: int, lb: int) -> float:
    # F1 of LCS precision (lcs/la) and recall (lcs/lb) simplifies to 2·lcs/(la+lb).
    return 0.0 if lcs == 0 else 2.0 * lcs / (la + lb)


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure between two texts (symmetric)."""
    ta, tb = rouge_tokens(a), rouge_tokens(b)
    return _f(lcs_length(ta, tb), len(ta), len(tb))


class RougePool:
    """A growing set of texts; `most_similar(text)` finds the pool entry with the highest ROUGE-L."""

    def __init__(self, texts: list[str] | None = None):
        self._tokens: list[list[str]] = []
        self._bags: list[Counter[str]] = []
        self.texts: list[str] = []
        for t in texts or []:
            self.add(t)

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str) -> None:
        toks = rouge_tokens(text)
        self.texts.append(text)
        self._tokens.append(toks)
        self._bags.append(Counter(toks))

    def most_similar(self, text: str, threshold: float = 0.0) -> tuple[float, str | None]:
        """(score, text) of the best match; returns as soon as one exceeds `threshold` (> 0)."""
        ta = rouge_tokens(text)
        bag, la = Counter(ta), len(ta)
        best, best_text = 0.0, None
        for tb, bb, other in zip(self._tokens, self._bags, self.texts):
            lb = len(tb)
            if la + lb == 0 or _f(min(la, lb), la, lb) <= best:
                continue  # even a full match of the shorter one cannot beat the best so far
            if _f(sum((bag & bb).values()), la, lb) <= best:
                continue  # the LCS is at most the shared bag of words
            score = _f(lcs_length(ta, tb), la, lb)
            if score > best:
                best, best_text = score, other
                if 0 < threshold < best:
                    break
        return best, best_text


def repetition_ratio(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier n-gram of the same text (0 = none, →1 = a loop)."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def is_degenerate(text: str, earlier: list[str] | None = None, max_repetition: float = 0.5,
                  max_similarity: float = 0.8) -> str | None:
    """Why a generated message is unusable (empty, looping, repeating an earlier one), or None."""
    if not text.strip():
        return "empty"
    if repetition_ratio(text) > max_repetition:
        return "repetitive"
    for prev in earlier or []:
        if rouge_l(text, prev) > max_similarity:
            return "repeats_earlier_turn"
    return None
