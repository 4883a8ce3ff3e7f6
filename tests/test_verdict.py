"""Judge-free style measures, bootstrap intervals, the headline generator, and the report's verdict."""

from __future__ import annotations

import json
import math
import random

import pytest

from protege.evaluate.headline import Estimate, StyleShift, headline
from protege.evaluate.intervals import bootstrap_ci, paired_diff, paired_ratio_diff, stratified_ci, task_mean
from protege.evaluate.style import (has_code, has_header, has_list, is_degenerate, is_refusal, style_measures,
                                    teacher_nll)

ANSWERS = [
    "Here are the steps:\n1. Preheat the oven.\n2. Mix the flour.\n3. Bake for 20 minutes.",
    "## Summary\nThe capital of France is Paris.",
    "Use this:\n```python\nprint('hi')\n```\nThat prints hi.",
    "I'm sorry, but I can't help with that request.",
    "the cat sat on the mat. " * 12,
    "Paris is the capital of France.",
    "- apples\n- pears",
    "As an AI language model, I do not have feelings, but here is a poem anyway.",
]


def test_format_features_on_hand_made_answers():
    assert [has_list(a) for a in ANSWERS] == [True, False, False, False, False, False, True, False]
    assert [has_header(a) for a in ANSWERS] == [False, True, False, False, False, False, False, False]
    assert [has_code(a) for a in ANSWERS] == [False, False, True, False, False, False, False, False]
    assert not has_list("1. Only one item")  # one line is not a list
    assert not has_header("#hashtag is not a header")


def test_repetition_and_refusal_on_hand_made_answers():
    assert [is_degenerate(a) for a in ANSWERS] == [False, False, False, False, True, False, False, False]
    assert is_degenerate("Sure!\nI can help with that.\nI can help with that.\nI can help with that.")
    assert not is_degenerate("One two three four five six seven eight nine ten eleven twelve thirteen.")
    assert [is_refusal(a) for a in ANSWERS] == [False, False, False, True, False, False, False, True]
    assert not is_refusal("Paris. " + "x" * 400 + " I'm sorry, but I can't say more.")  # a late caveat


def test_style_measures_of_an_answer_set():
    recs = [{"answers": [a], "finish_reasons": ["stop" if i % 2 == 0 else "length"]} for i, a in enumerate(ANSWERS)]
    m = style_measures(recs)
    assert m["n"] == 8 and m["stop_rate"] == 0.5 and m["stop_n"] == 8
    assert m["list_rate"] == pytest.approx(2 / 8) and m["header_rate"] == pytest.approx(1 / 8)
    assert m["code_rate"] == pytest.approx(1 / 8) and m["repetition_rate"] == pytest.approx(1 / 8)
    assert m["refusal_rate"] == pytest.approx(2 / 8)
    assert m["mean_chars"] == pytest.approx(sum(map(len, ANSWERS)) / 8)
    lo, hi = m["refusal_rate_ci"]
    assert lo <= 0.25 <= hi
    assert "stop_rate" not in style_measures([{"answers": ["x"]}])  # old files: reason unknown, not counted


def test_teacher_nll_is_lower_for_what_the_model_would_say(tiny_llama_dir):
    import torch

    from protege.chat import ChatFormat
    from protege.models import load

    model, tok = load(str(tiny_llama_dir))
    fmt = ChatFormat.from_tokenizer(tok)
    conv = [{"role": "user", "content": "Say something."}]
    prompt = fmt.encode_prompt(conv)
    with torch.no_grad():  # the model's own greedy answer is, by construction, likelier than a random one
        out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    own = tok.decode(out[0, len(prompt):], skip_special_tokens=True)
    rng = random.Random(0)
    other = "".join(rng.choice("qxzjkvw ") for _ in range(len(own)))
    mine = teacher_nll(model, fmt, [conv + [{"role": "assistant", "content": own}]], ids=["a"])
    theirs = teacher_nll(model, fmt, [conv + [{"role": "assistant", "content": other}]], ids=["a"])
    assert mine["nll"] < theirs["nll"] and mine["tokens"] > 0 and set(mine["per_item"]) == {"a"}
    # a hand check: NLL = -mean log p over the assistant tokens (content + end of turn)
    enc = fmt.encode(conv + [{"role": "assistant", "content": own}])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([enc.input_ids])).logits[0, :-1].float(), -1)
    picked = [logp[i, enc.input_ids[i + 1]].item() for i in range(len(enc.input_ids) - 1) if enc.assistant_mask[i + 1]]
    assert mine["nll"] == pytest.approx(-sum(picked) / len(picked), abs=1e-4)


@pytest.mark.parametrize("p, n", [(0.3, 40), (0.7, 100), (0.5, 25)])
def test_bootstrap_interval_covers_the_true_accuracy(p, n):
    covered = 0
    for seed in range(200):
        rng = random.Random(seed)
        values = [float(rng.random() < p) for _ in range(n)]
        lo, hi = bootstrap_ci(values, iters=400, seed=seed)
        covered += lo <= p <= hi
    assert covered / 200 >= 0.9


def test_paired_interval_covers_a_known_difference_and_beats_unpaired():
    covered, widths = 0, []
    for seed in range(100):
        rng = random.Random(seed)
        hard = {str(i): rng.random() for i in range(60)}  # item difficulty shared by both models
        a = {"t": {i: float(rng.random() < 0.2 + 0.6 * h) for i, h in hard.items()}}
        b = {"t": {i: float(rng.random() < 0.1 + 0.6 * h) for i, h in hard.items()}}
        d = paired_diff(a, b, iters=400, seed=seed)
        covered += d["lo"] <= 0.1 <= d["hi"]
        widths.append(d["hi"] - d["lo"])
    assert covered >= 88
    assert paired_diff({"t": {"1": 1.0}}, {"u": {"1": 1.0}}) is None


def test_stratified_interval_and_task_mean():
    items = {"a": {str(i): float(i % 2) for i in range(40)}, "b": {str(i): 1.0 for i in range(10)}}
    assert task_mean(items) == pytest.approx(0.75)  # tasks weigh the same, not items
    lo, hi = stratified_ci(items)
    assert lo < 0.75 < hi and hi - lo < 0.25


def test_paired_ratio_difference():
    a = {"x": [10.0, 5], "y": [10.0, 5]}
    b = {"x": [5.0, 5], "y": [5.0, 5]}
    d = paired_ratio_diff(a, b)
    assert d["diff"] == pytest.approx(1.0) and d["lo"] == pytest.approx(1.0) and d["items"] == 2


def test_headline_with_separated_and_overlapping_intervals():
    moved = StyleShift("teacher-answer NLL reduction", Estimate(0.4, 0.2, 0.6), " nats/token")
    flat = Estimate(-0.01, -0.08, 0.06)
    text = headline("student", "base", moved, flat, "plain prompting for both")
    assert text[0].startswith("Style: student moved toward the teacher") and "+0.400 [+0.200, +0.600]" in text[0]
    assert "no measurable difference" in text[1] and "interval includes 0" in text[1]
    assert "false promise" in text[2]
    lost = headline("student", "base", moved, Estimate(-0.2, -0.3, -0.1))
    assert "lost capability" in lost[1] and "false promise" in lost[2]
    gained = headline("student", "base", StyleShift("judge win rate", Estimate(0.05, -0.02, 0.1)),
                      Estimate(0.2, 0.1, 0.3))
    assert "no measurable difference" in gained[0] and "gained capability" in gained[1] and len(gained) == 2
    away = headline("s", "b", StyleShift("judge win rate", Estimate(-0.3, -0.4, -0.2)), None)
    assert "moved away" in away[0] and "no benchmark scores" in away[1]
    assert "no trustworthy style measure" in headline("s", "b", None, flat)[0]
    nan = Estimate(float("nan"), float("nan"), float("nan"))
    assert "no trustworthy" in headline("s", "b", StyleShift("x", nan), flat)[0]


def _bench(path, name, style, scores, other=None):
    path.mkdir(parents=True)

    def tasks(sc):
        return {"t": {"score": sum(sc) / len(sc), "primary": "acc", "n": len(sc), "ci": bootstrap_ci(sc),
                      "item_scores": {str(i): v for i, v in enumerate(sc)}}}

    res = {"model_name": name, "prompt_style": style, "tasks": tasks(scores),
           "other_style": {"prompt_style": "plain", "tasks": tasks(other)} if other else None}
    (path / "results.json").write_text(json.dumps(res))


def _judge(path, a, b, outcomes, trusted):
    path.mkdir(parents=True)
    rows = [{"id": str(i), "outcome": o, "verdicts": ["A", "B"], "length": [1, 1], "turns": ["q"],
             "answers": [["x"], ["y"]]} for i, o in enumerate(outcomes)]
    (path / "judgments.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from protege.evaluate.verdicts import pairwise_summary

    calib = {"n_judged": 48, "accuracy": 0.5 if not trusted else 0.95, "accuracy_ci": (0.4, 0.6), "by_kind": {},
             "position_consistency": 0.0 if not trusted else 0.9}
    res = {"mode": "pairwise", "judge": "j", "models": [a, b], "summary": pairwise_summary(rows), "calibration": calib,
           "trust": {"trustworthy": trusted, "reasons": [] if trusted else ["calibration accuracy 0.50 < 0.75"]},
           "verdicts": "logprob", "mean_length": {a: 1, b: 1}}
    (path / "judge_results.json").write_text(json.dumps(res))


def test_report_flags_an_untrustworthy_judge_and_uses_teacher_likeness(tmp_path):
    from protege.report import ReportConfig, collect, model_table, run

    n = 60
    _bench(tmp_path / "b-base", "base", "plain", [float(i % 2) for i in range(n)])
    # chat-format scores collapse (a format effect); plain scores equal the base's
    _bench(tmp_path / "b-student", "student", "chat", [0.0] * n, other=[float(i % 2) for i in range(n)])
    _bench(tmp_path / "b-teacher", "teacher", "chat", [1.0] * n)
    _judge(tmp_path / "j-student", "student", "teacher", ["win"] * 20, trusted=False)
    _judge(tmp_path / "j-base", "base", "teacher", ["loss"] * 20, trusted=False)
    for name, nll in (("base", 3.0), ("student", 2.0), ("teacher", 1.0)):
        d = tmp_path / f"a-{name}"
        d.mkdir()
        (d / "answers.jsonl").write_text(json.dumps({"id": "0", "turns": ["q"], "answers": ["a"], "model": name}) + "\n")
        per = {str(i): [nll * 10 + (i % 3), 10] for i in range(20)}
        (d / "teacher_nll.json").write_text(json.dumps({"nll": nll, "nll_ci": [nll - 0.1, nll + 0.1], "n": 20,
                                                        "tokens": 200, "per_item": per}))
    t = model_table(collect([str(tmp_path)]), base="base", teacher="teacher")
    h = t["headlines"]["student"]
    # the judge (win 20/20) failed calibration, so its verdict is not the style measure
    assert h["style"]["measure"] == "teacher-answer NLL reduction" and h["style"]["value"] == pytest.approx(1.0)
    # plain vs plain: no capability lost, even though the chat-format score fell to 0
    assert h["substance"]["value"] == pytest.approx(0.0) and "plain prompting for both" in h["substance"]["note"]
    assert "no measurable difference" in h["sentences"][1] and "moved toward the teacher" in h["sentences"][0]
    assert "with its chat format student − base = -0.500" in h["sentences"][1]
    rows = {r["model"]: r for r in t["rows"]}
    assert math.isnan(rows["student"]["style"])  # untrusted judge: no style gain from it
    out = tmp_path / "rep" / "report.html"
    run(ReportConfig(inputs=[str(tmp_path)], output=str(out), base="base", teacher="teacher"))
    page = out.read_text()
    assert "not trustworthy" in page and "kept out of the headline" in page and "<h2>Verdict</h2>" in page
    assert "plain: 0.500" in page
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "**student**: Style: student moved toward the teacher" in md and "NOT trustworthy" in md


def test_report_uses_a_trusted_judge_for_style(tmp_path):
    from protege.report import collect, model_table

    _bench(tmp_path / "b-base", "base", "plain", [1.0, 0.0] * 20)
    _bench(tmp_path / "b-student", "student", "plain", [1.0, 0.0] * 20)
    _judge(tmp_path / "j-student", "student", "teacher", ["win"] * 15 + ["tie"] * 5, trusted=True)
    _judge(tmp_path / "j-base", "base", "teacher", ["loss"] * 20, trusted=True)
    h = model_table(collect([str(tmp_path)]), base="base", teacher="teacher")["headlines"]["student"]
    assert h["style"]["measure"].startswith("judge win rate") and h["style"]["value"] == pytest.approx(0.875)
    assert "moved toward the teacher" in h["sentences"][0] and "false promise" in h["sentences"][2]


def test_style_verdict_when_each_round_is_judged_against_its_starting_model():
    """LLaMA-2-style rounds: teacher == base (the SFT model), so the base's own win rate is 0.5 by definition."""
    from protege.report import verdict

    items = {"arithmetic": {f"q{i}": float(i % 2) for i in range(40)}}
    row = {"plain_items": items, "items": items, "prompt_style": "plain", "teacher_nll": None}
    table = {"base": "sft", "teacher": "sft", "rows": [{"model": "sft", **row}, {"model": "round-1", **row}]}
    judged = [{"id": f"p{i}", "outcome": "loss" if i < 24 else "tie"} for i in range(30)]  # round-1 listed first
    data = {"judges": [{"mode": "pairwise", "models": ["round-1", "sft"], "judgments": judged,
                        "trust": {"trustworthy": True}}]}
    out = verdict(data, table, "round-1")
    assert out["style"] is not None
    assert out["style"]["value"] == pytest.approx(6 * 0.5 / 30 - 0.5)  # win rate 0.1 against the SFT model
    assert out["style"]["ci"][1] < 0 and "round-1 was judged worse than sft" in out["sentences"][0]
    data["judges"][0]["trust"] = {"trustworthy": False}  # an untrusted judge still gives no style verdict
    assert verdict(data, table, "round-1")["style"] is None
