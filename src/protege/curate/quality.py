"""`quality`: length bounds, repeated n-grams, refusal boilerplate, and LIMA-style top-k by a score.

The top-k selection reads a score some earlier process wrote into `meta` (the `score` step's reward
model, a judge grade); this step only ranks. With `top_k_diverse` it keeps the best of each of top_k
prompt clusters (LIMA chose for quality *and* diversity) instead of the top_k best overall.
"""

from __future__ import annotations

from typing import Any

from ..records import Record
from .clean import teacher_pattern
from .common import Context, StepResult, removal, texts, words
from .config import QualityStep

__all__ = ["apply", "repetition", "prompt_clusters"]


def repetition(text: str | list[str], n: int = 3) -> float:
    """Fraction of word n-grams that repeat an earlier one (0 = none, near 1 = a loop); text or its words."""
    w = words(text) if isinstance(text, str) else text
    grams = list(zip(*(w[i:] for i in range(n))))
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def _hit_token_limit(rec: Record) -> bool:
    reasons = rec.meta.get("finish_reasons") or [rec.meta.get("finish_reason")]
    return isinstance(reasons, list) and "length" in reasons


def _problem(rec: Record, opts: QualityStep, refusal: Any) -> tuple[str, str] | None:
    if opts.drop_truncated and _hit_token_limit(rec):
        return "truncated", "an answer was cut off at the generator's token limit"
    if opts.max_total_words is not None:
        total = sum(len(words(t)) for t in texts(rec, "all"))
        if total > opts.max_total_words:
            return "too_long", f"{total} words > {opts.max_total_words}"
    for i, answer in enumerate(texts(rec, "assistant")):
        answer_words = words(answer)
        n = len(answer_words)
        if n < opts.min_response_words:
            return "too_short", f"answer {i} has {n} words < {opts.min_response_words}"
        if opts.max_response_words is not None and n > opts.max_response_words:
            return "too_long", f"answer {i} has {n} words > {opts.max_response_words}"
        rep = repetition(answer_words, opts.repetition_ngram)
        if rep > opts.max_repetition:
            return "repetition", f"answer {i}: {rep:.0%} of {opts.repetition_ngram}-grams repeated"
        hit = refusal.search(answer) if refusal is not None else None
        if hit:
            return "refusal", f"answer {i}: {hit.group(0)!r}"
    return None


def prompt_clusters(prompts: list[str], k: int, seed: int = 0, dims: int = 1024, iters: int = 15) -> Any:
    """Cluster label (0..k-1) of each prompt: spherical k-means (k-means++ start, seeded) over hashed TF-IDF
    word vectors. Written with numpy because scikit-learn is not a runtime dependency and LIMA-sized pools
    (thousands to tens of thousands of prompts) need nothing more."""
    import numpy as np
    import xxhash

    n = len(prompts)
    x = np.zeros((n, dims), np.float32)
    for row, text in enumerate(prompts):
        for w in words(text):
            x[row, xxhash.xxh32_intdigest(w.encode("utf-8", "surrogatepass")) % dims] += 1.0
    df = (x > 0).sum(axis=0)
    x *= np.log((1 + n) / (1 + df)) + 1.0                                 # idf
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = min(k, n)
    rng = np.random.default_rng(seed)
    centers = [int(rng.integers(n))]
    dist = 1.0 - x @ x[centers[0]]
    for _ in range(1, k):                                                 # k-means++: far points more likely
        p = np.clip(dist, 0, None) ** 2
        nxt = int(rng.choice(n, p=p / p.sum())) if p.sum() > 0 else int(rng.integers(n))
        centers.append(nxt)
        dist = np.minimum(dist, 1.0 - x @ x[nxt])
    c = x[centers].copy()
    labels = np.zeros(n, np.int64)
    for _ in range(iters):
        labels = np.concatenate([np.argmax(x[b:b + 4096] @ c.T, axis=1) for b in range(0, n, 4096)])
        for j in range(k):
            members = x[labels == j]
            if len(members):
                v = members.sum(axis=0)
                c[j] = v / max(float(np.linalg.norm(v)), 1e-12)
    return labels


def _score(rec: Record, key: str) -> float | None:
    value: Any = rec.meta
    for part in key.removeprefix("meta.").split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def apply(records: list[Record], opts: QualityStep, ctx: Context | None = None) -> StepResult:
    """Remove records failing a rule; then, with top_k_by/top_k, keep the best-scoring top_k (order kept)."""
    refusal = teacher_pattern(tuple(opts.refusals))
    kept, removed = [], []
    for rec in records:
        problem = _problem(rec, opts, refusal)
        if problem is None:
            kept.append(rec)
        else:
            removed.append(removal(rec, *problem))
    stats: dict[str, Any] = {}
    if opts.top_k_by and opts.top_k is not None and len(kept) > opts.top_k:
        scored = [(_score(r, opts.top_k_by), i) for i, r in enumerate(kept)]
        stats["unscored"] = sum(1 for s, _ in scored if s is None)
        # best first; unscored last; ties by input order (stable, deterministic)
        ranked = sorted(scored, key=lambda si: (si[0] is None, -(si[0] or 0.0), si[1]))
        if opts.top_k_diverse:
            labels = prompt_clusters([texts(r, "first_user")[0] for r in kept], opts.top_k, seed=getattr(ctx, "seed", 0))
            best: dict[int, int] = {}
            for _, i in ranked:  # the best of each cluster, then the best of the rest for empty clusters
                best.setdefault(int(labels[i]), i)
            chosen = set(best.values())
            chosen |= set([i for _, i in ranked if i not in chosen][: opts.top_k - len(chosen)])
            stats["clusters"] = len(best)
            why = "not the best of its prompt cluster"
        else:
            chosen = {i for _, i in ranked[: opts.top_k]}
            why = f"below the top {opts.top_k} (cutoff {ranked[opts.top_k - 1][0]})"
        for _, i in ranked:
            if i not in chosen:
                removed.append(removal(kept[i], "below_top_k", f"{opts.top_k_by}={_score(kept[i], opts.top_k_by)} {why}"))
        kept = [r for i, r in enumerate(kept) if i in chosen]
    return StepResult(kept, removed, stats=stats)
