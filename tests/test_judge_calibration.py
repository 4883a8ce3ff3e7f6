"""Judge calibration (known-better pairs), trust marking, and log-probability verdicts."""

from __future__ import annotations

import json
import math

import pytest

from protege.evaluate import judge
from protege.evaluate.calibration import (KINDS, REFUSAL, calibration_pairs, calibration_summary, corrupt,
                                          load_items, trust_verdict)
from protege.teachers import TeacherResponse
from test_eval_judge import _answers  # noqa: E402  (answer sets of up to 3 plain prompts)


def test_every_corruption_is_a_different_worse_answer():
    items = load_items()
    assert len(items) >= 24 and len({i["id"] for i in items}) == len(items)
    item, other = items[0], items[1]
    for kind in KINDS:
        bad = corrupt(kind, item, other)
        assert bad and bad != item["good"], kind
    assert item["good"].startswith(corrupt("truncated", item, other))
    assert len(corrupt("truncated", item, other)) < len(item["good"]) / 2
    rep = corrupt("repetitive", item, other)
    first = item["good"].split(". ")[0]
    assert rep.count(first) >= 3
    assert corrupt("off_topic", item, other) == other["good"]
    assert corrupt("refusal", item, other) == REFUSAL
    with pytest.raises(ValueError, match="unknown calibration kind"):
        corrupt("nope", item, other)


def test_pairs_cover_every_kind_and_are_deterministic():
    pairs = calibration_pairs(12, seed=3)
    assert len(pairs) == 12 and {p["kind"] for p in pairs} == set(KINDS)
    assert pairs == calibration_pairs(12, seed=3)
    assert pairs != calibration_pairs(12, seed=4)
    assert len({p["id"] for p in calibration_pairs(1000)}) == len(load_items()) * len(KINDS)  # capped, unique
    assert calibration_pairs(0) == []


class ScriptedJudge:
    """A generating judge with a fixed policy: 'A' always, or the oracle that knows the better answer."""

    scores_choices = False
    name = "scripted"

    def __init__(self, policy: str):
        self.policy = policy
        self.good = {i["prompt"]: i["good"] for i in load_items()}

    def complete(self, convs, params, progress=False):
        out = []
        for c in convs:
            text = c[-1]["content"]
            good = self.good.get(text.split("[Question]\n")[1].split("\n[End of question]")[0])
            if self.policy == "A":
                out.append(TeacherResponse("Verdict: A"))
                continue
            if "Rating: N" in text:
                ans = text.split("[Answer A]\n")[1].split("\n[End of answer A]")[0]
                out.append(TeacherResponse("Rating: 9" if ans == good else "Rating: 3"))
                continue
            a = text.split("[Answer A]\n")[1].split("\n[End of answer A]")[0]
            b = text.split("[Answer B]\n")[1].split("\n[End of answer B]")[0]
            out.append(TeacherResponse("Verdict: A" if a == good else "Verdict: B" if b == good else "Verdict: tie"))
        return out

    def close(self):
        pass


@pytest.mark.parametrize("policy, accuracy, consistency, trusted", [("A", 0.5, 0.0, False), ("oracle", 1.0, 1.0, True)])
def test_scripted_judges_get_the_calibration_they_deserve(tmp_path, policy, accuracy, consistency, trusted):
    _answers(tmp_path / "a", "student", ["x", "y", "z"])
    _answers(tmp_path / "b", "teacher", ["p", "q", "r"])
    cfg = judge.JudgeConfig(answers=[str(tmp_path / "a"), str(tmp_path / "b")], out_dir=str(tmp_path / "j"),
                            calibration=24)
    r = judge.run(cfg, teacher=ScriptedJudge(policy))
    cal = r["calibration"]
    assert r["verdicts"] == "generate"
    assert cal["n_judged"] == 24 and cal["accuracy"] == pytest.approx(accuracy)
    assert cal["position_consistency"] == pytest.approx(consistency)
    assert r["trust"]["trustworthy"] is trusted
    if not trusted:
        assert any("accuracy" in why for why in r["trust"]["reasons"])
        assert any("position consistency" in why for why in r["trust"]["reasons"])
    rows = (tmp_path / "j" / "calibration.jsonl").read_text().splitlines()
    assert len(rows) == 24 and {json.loads(x)["kind"] for x in rows} == set(KINDS)
    saved = json.loads((tmp_path / "j" / "judge_results.json").read_text())
    assert saved["trust"]["trustworthy"] is trusted


def test_single_mode_is_calibrated_by_comparing_grades(tmp_path):
    _answers(tmp_path / "a", "student", ["x"])
    cfg = judge.JudgeConfig(mode="single", answers=[str(tmp_path / "a")], out_dir=str(tmp_path / "j"), calibration=12)
    r = judge.run(cfg, teacher=ScriptedJudge("oracle"))
    assert r["calibration"]["accuracy"] == 1.0 and r["calibration"]["position_consistency"] is None
    assert r["trust"]["trustworthy"] is True


def test_trust_needs_the_interval_above_chance():
    few = calibration_summary([{"kind": "refusal", "verdicts": ["A", "B"], "outcome": "win"}] * 4
                              + [{"kind": "refusal", "verdicts": ["B", "A"], "outcome": "loss"}])
    assert few["accuracy"] == pytest.approx(0.8) and few["accuracy_ci"][0] <= 0.5
    t = trust_verdict(few, 0.75, 0.5)
    assert not t["trustworthy"] and "interval" in t["reasons"][0]
    many = calibration_summary([{"kind": "refusal", "verdicts": ["A", "B"], "outcome": "win"}] * 40)
    assert trust_verdict(many, 0.75, 0.5)["trustworthy"]


def test_logprob_verdicts_on_a_tiny_model(tmp_path, tiny_llama_dir):
    from protege.teachers import TeacherConfig, make_teacher

    _answers(tmp_path / "a", "student", ["The answer is four.", "Paris is the capital."])
    _answers(tmp_path / "b", "teacher", ["I think it might be 5.", "Rome."])
    cfg = judge.JudgeConfig(answers=[str(tmp_path / "a"), str(tmp_path / "b")], out_dir=str(tmp_path / "j"),
                            judge=TeacherConfig(model=str(tiny_llama_dir)), calibration=6)
    r = judge.run(cfg)
    assert r["verdicts"] == "logprob" and r["summary"]["error_rate"] == 0  # never unparseable
    rows = [json.loads(x) for x in (tmp_path / "j" / "judgments.jsonl").read_text().splitlines()]
    for row in rows:
        assert len(row["probs"]) == 2  # both orders were scored
        for p in row["probs"]:
            assert set(p) == {"A", "B", "tie"} and math.isclose(sum(p.values()), 1.0, rel_tol=1e-6)
            assert row["verdicts"][row["probs"].index(p)] == max(p, key=p.get)
        assert 0 <= row["p_win"] <= 1
    # the two orders are different conversations, so their probabilities differ
    assert rows[0]["probs"][0] != rows[0]["probs"][1]
    assert r["calibration"]["n_judged"] == 6 and "mean_p_good" in r["calibration"]
    # cached: a second run scores nothing again and gives the same verdicts
    teacher = make_teacher(cfg.judge, cache_dir=tmp_path / "j")
    again = judge.run(cfg, teacher=teacher)
    assert teacher.stats["sent"] == 0 and teacher.stats["cache_hits"] == 2 * 2 + 2 * 6
    assert again["summary"] == r["summary"]
    teacher.close()


def test_logprob_probabilities_match_a_plain_forward(tiny_llama_dir):
    import torch

    from protege.engine.choices import option_token_ids
    from protege.teachers import TeacherConfig, make_teacher

    t = make_teacher(TeacherConfig(model=str(tiny_llama_dir)))
    conv = [{"role": "user", "content": "Which is better?"}]
    probs = t.choice_probs([conv], "Verdict:", [" A", " B", " tie"])[0]
    eng = t.engine
    ids = eng.chat_format.encode_prompt(conv) + eng.tokenizer.encode("Verdict:", add_special_tokens=False)
    seqs = option_token_ids(eng.tokenizer, "Verdict:", [" A", " B", " tie"])
    logps = []
    with torch.no_grad():  # the plain way: one full forward per option, sum the option's token log-probs
        for opt in seqs:
            lp = torch.log_softmax(eng.model(input_ids=torch.tensor([ids + opt])).logits[0].double(), -1)
            logps.append(sum(lp[len(ids) - 1 + k, tok].item() for k, tok in enumerate(opt)))
    expect = torch.softmax(torch.tensor(logps), -1).tolist()
    assert probs == pytest.approx(expect, abs=1e-5)
    t.close()


def test_logprob_verdicts_refused_for_an_api_judge(tmp_path):
    from protege.errors import StageError

    _answers(tmp_path / "a", "student", ["x"])
    _answers(tmp_path / "b", "teacher", ["y"])
    cfg = judge.JudgeConfig(answers=[str(tmp_path / "a"), str(tmp_path / "b")], out_dir=str(tmp_path / "j"),
                            verdicts="logprob")
    with pytest.raises(StageError, match="needs a local judge"):
        judge.run(cfg, teacher=ScriptedJudge("A"))


@pytest.mark.slow
def test_the_default_builtin_judge_passes_calibration(tmp_path):
    """The real-default check: the built-in judge (Qwen2.5-Coder-1.5B Q4_K_M in llama.cpp) must pass the
    calibration it is held to; measured 0.896 on these 24 pairs (BENCHMARKS.md)."""
    pytest.importorskip("llama_cpp")
    from conftest import builtin_model

    builtin_model(judge.DEFAULT_JUDGE)
    _answers(tmp_path / "a", "student", ["Paris is the capital of France."])
    _answers(tmp_path / "b", "teacher", ["I don't know."])
    r = judge.run(judge.JudgeConfig(answers=[str(tmp_path / "a"), str(tmp_path / "b")], out_dir=str(tmp_path / "j"),
                                    calibration=24))
    assert r["verdicts"] == "logprob" and r["judge"] == judge.DEFAULT_JUDGE
    assert r["calibration"]["accuracy"] >= 0.75 and r["trust"]["trustworthy"], r["trust"]
