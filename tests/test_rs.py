"""Rejection sampling: the unbiased best-of-k estimator, keeping the best (across rounds), SFT on it."""

from __future__ import annotations

import json
import math
import random

import pytest

from protege.train.rs import RSConfig, best_of_curve, expected_best_of, run


def test_expected_best_of_matches_enumeration():
    import itertools

    rewards = [0.1, 0.7, 0.3, 0.9, 0.5]
    for j in range(1, 6):
        subsets = list(itertools.combinations(rewards, j))
        assert expected_best_of(rewards, j) == pytest.approx(sum(max(s) for s in subsets) / len(subsets))
    assert expected_best_of(rewards, 1) == pytest.approx(sum(rewards) / 5)
    assert expected_best_of(rewards, 5) == 0.9
    curve = best_of_curve([rewards, [0.0, 1.0, 0.0, 0.0, 0.0]])
    assert [c["k"] for c in curve] == [1, 2, 3, 4, 5]
    assert all(a["reward"] <= b["reward"] for a, b in zip(curve, curve[1:]))
    assert curve[-1]["kl_nats"] == pytest.approx(math.log(5) - 4 / 5)
    with pytest.raises(ValueError):
        expected_best_of(rewards, 6)


def _prompts(path, n=16):
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"say something {i}"}) + "\n" for i in range(n)))
    return str(path)


def test_rs_keeps_the_best_fine_tunes_and_resumes(tmp_path, tiny_policy_dir):
    prompts = _prompts(tmp_path / "p.jsonl")
    cfg = dict(model=str(tiny_policy_dir), prompts=prompts, k=4, max_new_tokens=3, chunk=4, eval_fraction=0.25,
               reward={"kind": "rule", "rule": "format", "pattern": r"^ "}, epochs=3, learning_rate=1e-2,
               batch_size=4, tensorboard=False, lora={"r": 8, "alpha": 16, "trainable_tokens": "none"})
    s = run(RSConfig(**cfg, out_dir=str(tmp_path / "r1")))
    out = tmp_path / "r1"
    best = [json.loads(x) for x in (out / "best.jsonl").read_text().splitlines()]
    assert len(best) == s["prompts"] == 12 and s["samples"] == 48
    for rec in best:  # the kept answer is the group's best
        assert rec["reward"] == max(rec["meta"]["round_rewards"])
        assert rec["messages"][-1]["role"] == "assistant"
    curve = s["best_of_k"]
    assert curve[-1]["reward"] >= curve[0]["reward"] and curve[-1]["reward"] > 0
    assert (out / "best_of_k.png").exists()
    # SFT on the kept answers: loss fell, and the held-out eval starts at KL 0
    rows = [json.loads(x) for x in (out / "sft" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert s["eval"]["start"]["kl"] == pytest.approx(0.0, abs=1e-6) and s["eval"]["after"]["kl"] != 0
    # the proxy on the kept answers beats the proxy of the samples on average
    assert sum(r["reward"] for r in best) / len(best) >= curve[0]["reward"]
    # rerun: every sample comes from the cache, the same answers are kept
    s2 = run(RSConfig(**cfg, out_dir=str(out)))
    assert s2["decoded_tokens"] == 0 and (out / "best.jsonl").read_text().count("\n") == 12
    # a second round with `previous`: a prompt whose earlier best was better keeps it
    old = tmp_path / "old.jsonl"
    recs = [dict(r, reward=5.0, messages=r["messages"][:-1] + [{"role": "assistant", "content": "earlier"}])
            for r in random.Random(0).sample(best, 3)]
    old.write_text("".join(json.dumps(r) + "\n" for r in recs))
    s3 = run(RSConfig(**cfg, out_dir=str(tmp_path / "r2"), previous=[str(old)]))
    assert s3["kept_from_earlier_rounds"] == 3
    kept = [json.loads(x) for x in (tmp_path / "r2" / "best.jsonl").read_text().splitlines()]
    assert sum(r["messages"][-1]["content"] == "earlier" for r in kept) == 3


def test_a_prompt_whose_answers_are_all_empty_is_left_out_not_trained_on(tmp_path, tiny_policy_dir, monkeypatch):
    """A sample that is only a stop token has no text: it cannot be an SFT target (the SFT reader refuses an
    empty turn), so its prompt is dropped and counted, and the others are still kept."""
    from protege.train import rs

    real = rs.sample_rollouts

    def some_empty(engine, chat, items, indices, k, *args, **kw):
        out = real(engine, chat, items, indices, k, *args, **kw)
        for r in out:
            if r.prompt_index == indices[0]:
                r.text = ""
        return out

    monkeypatch.setattr(rs, "sample_rollouts", some_empty)
    prompts = _prompts(tmp_path / "p.jsonl", n=8)
    s = run(RSConfig(model=str(tiny_policy_dir), prompts=prompts, k=2, max_new_tokens=3, chunk=4, eval_fraction=0.0,
                     reward={"kind": "rule", "rule": "format", "pattern": r"^ "}, max_steps=1, batch_size=4,
                     tensorboard=False, lora={"r": 8, "alpha": 16, "trainable_tokens": "none"},
                     out_dir=str(tmp_path / "r")))
    assert s["dropped_all_empty"] == 2 and s["kept"] == 6  # the first prompt of each chunk of 4
    best = [json.loads(x) for x in (tmp_path / "r" / "best.jsonl").read_text().splitlines()]
    assert all(rec["messages"][-1]["content"].strip() for rec in best)
