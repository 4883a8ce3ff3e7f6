"""ROUGE-L parity with rouge-score, the pool's pruning, and degenerate-text checks."""

from __future__ import annotations

import random

from rouge_score import rouge_scorer

from protege.generate.text import RougePool, is_degenerate, lcs_length, repetition_ratio, rouge_l, rouge_tokens

WORDS = "the a cat dog write explain list three tips sleep story poem classify review sentence of for".split()


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 14))) + rng.choice(["", ".", "?", "!!"])
            for _ in range(n)]


def test_rouge_l_matches_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    texts = _random_texts(120) + ["Give three tips, for SLEEP!", "give three tips for sleep", "", "C++ & Python3 code"]
    for a, b in zip(texts, reversed(texts)):
        assert abs(rouge_l(a, b) - scorer.score(b, a)["rougeL"].fmeasure) < 1e-9, (a, b)


def test_lcs_and_tokens():
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4
    assert lcs_length([], ["a"]) == 0
    assert rouge_tokens("Hello, World! x-ray 3.5") == ["hello", "world", "x", "ray", "3", "5"]


def test_pool_pruning_finds_the_true_maximum():
    pool_texts = _random_texts(200, seed=1)
    pool = RougePool(pool_texts)
    for q in _random_texts(60, seed=2):
        score, match = pool.most_similar(q)
        brute = max((rouge_l(q, t) for t in pool_texts), default=0.0)
        assert abs(score - brute) < 1e-12
        if score > 0:
            assert abs(rouge_l(q, match) - score) < 1e-12


def test_pool_threshold_stops_early_but_stays_above_threshold():
    pool = RougePool(["write a poem about the sea", "write a poem about the sea at night"])
    score, _ = pool.most_similar("write a poem about the sea", threshold=0.7)
    assert score > 0.7
    assert RougePool().most_similar("anything") == (0.0, None)


def test_degenerate_text():
    assert repetition_ratio("") == 0.0
    assert repetition_ratio("one two three four five") == 0.0
    assert repetition_ratio("go go go " * 20) > 0.9
    assert is_degenerate("   ") == "empty"
    assert is_degenerate("and then and then and then and then and then") == "repetitive"
    assert is_degenerate("What is the capital of France?", ["what is the capital of France"]) == "repeats_earlier_turn"
    assert is_degenerate("A fresh and different question here?", ["Something else entirely."]) is None
