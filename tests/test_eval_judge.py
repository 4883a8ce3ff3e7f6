"""Judge: verdict parsing (incl. garbage), the tie rule under order swap, bias figures, bootstrap, the stage."""

from __future__ import annotations

import json

import pytest

from protege.errors import StageError
from protege.evaluate.intervals import bootstrap_ci
from protege.evaluate.verdicts import (combine_orders, pairwise_messages, pairwise_summary, parse_pairwise, parse_rating,
                                       single_messages)


@pytest.mark.parametrize("text, verdict", [
    ("Verdict: A\nA is more accurate.", "A"),
    ("verdict: b", "B"),
    ("**Verdict:** [[B]] because...", "B"),
    ("Verdict: tie. Both are fine.", "tie"),
    ("Verdict - Answer A", "A"),
    ("After comparing, [[A]]", "A"),
    ("[[C]]", "tie"),
    ("I think Assistant B is better overall.", "B"),
    ("Both answers are equally good.", "tie"),
    ("A: A: A: A:", "A"),
    ("B\n\nbecause it is shorter", "B"),
    ("Tie.", "tie"),
])
def test_parse_pairwise(text, verdict):
    assert parse_pairwise(text) == verdict


@pytest.mark.parametrize("garbage", ["", "The capital of France is Paris.", "A and B both mention cats.",
                                     "Verdict: maybe", "ABABAB", None, "Verdict:",
                                     "A good answer would mention Paris.", "Both B and A are long."])
def test_parse_pairwise_garbage_is_none(garbage):
    assert parse_pairwise(garbage) is None


def test_parse_rating():
    assert parse_rating("Rating: 7\nGood.") == 7.0
    assert parse_rating("rating: [[8]]") == 8.0
    assert parse_rating("I'd give it 6/10") == 6.0
    assert parse_rating("Rating: 11") is None  # out of range
    assert parse_rating("Rating: 0") is None
    assert parse_rating("great answer!") is None
    assert parse_rating("") is None


def test_tie_rule_under_order_swap():
    # model 1 shown first (A) in order 1, second (B) in order 2
    assert combine_orders("A", "B") == "win"    # both orders pick model 1
    assert combine_orders("B", "A") == "loss"   # both orders pick model 2
    assert combine_orders("A", "A") == "tie"    # the judge always picks the first position
    assert combine_orders("B", "B") == "tie"    # ... or always the second
    assert combine_orders("tie", "tie") == "tie"
    assert combine_orders("A", "tie") == "tie"
    assert combine_orders(None, "A") == "error" and combine_orders("A", None) == "error"


def test_swapping_the_models_mirrors_the_outcome():
    for v1 in ("A", "B", "tie"):
        for v2 in ("A", "B", "tie"):
            # judging (m2, m1) shows the same prompts in the opposite order: order 1 and 2 exchange
            mirrored = combine_orders(v2, v1)
            expected = {"win": "loss", "loss": "win", "tie": "tie"}[combine_orders(v1, v2)]
            assert mirrored == expected


def _row(v1, v2, la=10, lb=20):
    return {"verdicts": [v1, v2], "outcome": combine_orders(v1, v2), "length": [la, lb]}


def test_pairwise_summary_bias_figures():
    rows = [_row("A", "B"), _row("A", "A"), _row("B", "A"), _row(None, "A"), _row("A", "B", la=30, lb=5)]
    s = pairwise_summary(rows, iters=200)
    assert s["n"] == 5 and s["n_judged"] == 4 and s["error_rate"] == pytest.approx(0.2)
    assert (s["win"], s["tie"], s["loss"]) == pytest.approx((0.5, 0.25, 0.25))
    assert s["win_rate"] == pytest.approx((2 + 0.5) / 4)
    assert s["position_consistency"] == pytest.approx(3 / 4)
    # decisive per-order verdicts: A,B, A,A, B,A, A(2nd of error row), A,B -> A shown first wins 6 of 9
    assert s["first_position_rate"] == pytest.approx(6 / 9)
    # longer answer wins: rows 1-4 model 2 is longer, row 5 model 1 is longer
    assert 0 <= s["length_bias"] <= 1 and s["length_bias_n"] == 9
    lo, hi = s["win_ci"]
    assert 0 <= lo <= s["win"] <= hi <= 1


def test_length_bias_detects_a_judge_that_loves_long_answers():
    rows = [_row("B", "A", la=10, lb=100) for _ in range(5)] + [_row("A", "B", la=100, lb=10) for _ in range(5)]
    assert pairwise_summary(rows)["length_bias"] == 1.0


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    vals = [1.0] * 30 + [0.0] * 70
    assert bootstrap_ci(vals, 500, seed=3) == bootstrap_ci(vals, 500, seed=3)
    lo, hi = bootstrap_ci(vals, 500)
    assert lo < 0.3 < hi and hi - lo < 0.25
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0)


def test_prompts_show_both_answers_and_reference():
    msgs = pairwise_messages(["What is 2+2?"], ["four"], ["five"], reference=["4"])
    user = msgs[-1]["content"]
    assert user.index("four") < user.index("five") and "[Reference answer]\n4" in user and "Verdict: A" in user
    multi = single_messages(["Hi", "And then?"], ["Hello", "Bye"])[-1]["content"]
    assert "turn 2" in multi and "Rating: N" in multi


class FakeTeacher:
    """Stands in for an LLM judge: prefers the answer containing 'good'; garbage for 'confuse' prompts."""

    def __init__(self):
        self.calls = []

    def complete(self, convs, params, progress=False):
        from protege.teachers import TeacherResponse

        self.calls.append((len(convs), params.temperature))
        out = []
        for c in convs:
            text = c[-1]["content"]
            if "confuse" in text:
                out.append(TeacherResponse("hmm"))
            elif "Rating: N" in text:
                out.append(TeacherResponse("Rating: 9" if "good" in text.split("[Answer A]")[1] else "Rating: 2"))
            else:
                a = text.split("[Answer A]")[1].split("[Answer B]")[0]
                out.append(TeacherResponse("Verdict: A" if "good" in a else "Verdict: B"))
        return out

    def close(self):
        pass


def _answers(path, name, texts):
    path.mkdir(parents=True)
    with open(path / "answers.jsonl", "w") as fh:
        for i, t in enumerate(texts):
            q = "confuse me" if i == 3 else f"question {i}"
            fh.write(json.dumps({"id": str(i), "category": "x", "turns": [q], "answers": [t], "reference": None,
                                 "model": name}) + "\n")


def test_judge_stage_pairwise_and_single(tmp_path, monkeypatch):
    from protege.evaluate import judge

    fake = FakeTeacher()
    monkeypatch.setattr("protege.teachers.make_teacher", lambda cfg, cache_dir=None: fake)
    _answers(tmp_path / "a", "student", ["good", "good", "bad", "x"])
    _answers(tmp_path / "b", "teacher", ["bad", "good too", "good", "y"])
    r = judge.run(judge.JudgeConfig(answers=[str(tmp_path / "a"), str(tmp_path / "b")], out_dir=str(tmp_path / "j")))
    s = r["summary"]
    assert r["models"] == ["student", "teacher"]
    assert (s["win"], s["tie"], s["loss"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert s["error_rate"] == pytest.approx(0.25)  # the "confuse" prompt: unparseable twice
    assert fake.calls[1] == (2, 0.7)  # only the two unparseable requests were retried, sampled
    rows = [json.loads(x) for x in (tmp_path / "j" / "judgments.jsonl").read_text().splitlines()]
    assert rows[3]["outcome"] == "error" and rows[3]["retried"] == [True, True]
    assert (tmp_path / "j" / "judge_results.json").exists() and (tmp_path / "j" / "manifest.json").exists()
    r = judge.run(judge.JudgeConfig(mode="single", answers=[str(tmp_path / "a"), str(tmp_path / "b")],
                                    out_dir=str(tmp_path / "s")))
    assert r["summary"]["student"]["mean_rating"] == pytest.approx((9 + 9 + 2) / 3)
    with pytest.raises(StageError, match="reference"):
        judge.run(judge.JudgeConfig(mode="reference", answers=[str(tmp_path / "a")], out_dir=str(tmp_path / "r")))
    with pytest.raises(StageError, match="exactly two"):
        judge.run(judge.JudgeConfig(answers=[str(tmp_path / "a")], out_dir=str(tmp_path / "x")))


def test_read_prompts_formats_and_errors(tmp_path):
    from protege.errors import RecordError
    from protege.evaluate.answer import read_prompts

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["a", "b"], "reference": ["r1", "r2"]})
                 + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
                 + json.dumps({"prompt": "p", "reference": "r"}) + "\n")
    rows = read_prompts(f)
    assert rows[0]["id"] == "81" and rows[0]["turns"] == ["a", "b"] and rows[2]["reference"] == ["r"]
    f.write_text('{"turns": []}\n')
    with pytest.raises(RecordError, match="p.jsonl:1"):
        read_prompts(f)
    f.write_text('{"nothing": 1}\n')
    with pytest.raises(RecordError, match="turns"):
        read_prompts(f)


def test_mt_bench_file_reads(shared_data):
    from protege.evaluate.answer import read_prompts

    rows = read_prompts(shared_data / "mt_bench_question.jsonl")
    assert len(rows) == 80 and all(len(r["turns"]) == 2 for r in rows)
    assert any(r["reference"] for r in rows)


def test_answer_stage_multi_turn_on_tiny_model(tmp_path, tiny_llama_dir):
    from protege.evaluate.answer import AnswerConfig, read_answers, run

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"id": "q1", "turns": ["Name the capital of France.", "And of Italy?"]}) + "\n"
                 + json.dumps({"id": "q2", "turns": ["Two plus three?"]}) + "\n")
    cfg = AnswerConfig(model=str(tiny_llama_dir), prompts=str(f), out_dir=str(tmp_path / "ans"), max_new_tokens=5)
    r = run(cfg)
    assert {k: r[k] for k in ("prompts", "turns", "model")} == {"prompts": 2, "turns": 3, "model": "tiny-llama"}
    rows = read_answers(tmp_path / "ans")
    assert [len(x["answers"]) for x in rows] == [2, 1]
    # why each answer ended, parallel to the answers, counted in the result and the manifest
    assert [len(x["finish_reasons"]) for x in rows] == [2, 1]
    assert all(f in ("stop", "length") for x in rows for f in x["finish_reasons"])
    assert r["stopped"] + r["cut_at_max_tokens"] == 3
    manifest = json.loads((tmp_path / "ans" / "manifest.json").read_text())
    assert manifest["counts"]["stop_rate"] == r["stop_rate"] == pytest.approx(r["stopped"] / 3, abs=1e-4)
    before = rows
    run(cfg)  # the second run is answered from the cache, identically
    assert read_answers(tmp_path / "ans") == before


def test_answer_stage_sampling_seed_and_top_p(tmp_path, tiny_llama_dir):
    from protege.evaluate.answer import AnswerConfig, read_answers, run

    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Tell me about topic {i}."}) + "\n" for i in range(3)))

    def answers(name: str, **sampling) -> list[str]:
        run(AnswerConfig(model=str(tiny_llama_dir), prompts=str(f), out_dir=str(tmp_path / name), max_new_tokens=8,
                         **sampling))
        return [a for x in read_answers(tmp_path / name) for a in x["answers"]]

    hot = {"temperature": 1.5}
    assert answers("s0", **hot, seed=0) == answers("s0-again", **hot, seed=0)  # same seed, fresh run: same answers
    assert answers("s1", **hot, seed=1) != answers("s0", **hot, seed=0)
    assert answers("nucleus", **hot, top_p=1e-6) == answers("greedy")  # a tiny nucleus keeps only the argmax


def test_answer_stage_records_why_each_answer_ended(tmp_path):
    """Through a real HTTP teacher that cuts exactly the answers to prompts containing RAMBLE."""
    from fake_openai_server import FakeServer
    from protege.evaluate.answer import AnswerConfig, read_answers, run

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"id": "a", "turns": ["Say hi.", "Now RAMBLE on."]}) + "\n"
                 + json.dumps({"id": "b", "prompt": "RAMBLE about cats."}) + "\n"
                 + json.dumps({"id": "c", "prompt": "Two plus three?"}) + "\n")
    server = FakeServer()
    try:
        r = run(AnswerConfig(model="echo", backend="openai", base_url=server.url, prompts=str(f),
                             out_dir=str(tmp_path / "ans")))
    finally:
        server.close()
    rows = {x["id"]: x for x in read_answers(tmp_path / "ans")}
    assert rows["a"]["finish_reasons"] == ["stop", "length"]
    assert rows["b"]["finish_reasons"] == ["length"] and rows["c"]["finish_reasons"] == ["stop"]
    assert (r["stopped"], r["cut_at_max_tokens"], r["stop_rate"]) == (2, 2, 0.5)


def test_stop_counts_on_answer_files_without_finish_reasons():
    from protege.evaluate.answer import stop_counts

    old = [{"id": "1", "turns": ["q"], "answers": ["a"]}]  # written before finish_reasons existed
    assert stop_counts(old) == {"stopped": 0, "cut_at_max_tokens": 0, "stop_rate": None}
    new = [{"answers": ["a", "b"], "finish_reasons": ["stop", "length"]}, {"answers": ["c"], "finish_reasons": ["stop"]}]
    assert stop_counts(old + new) == {"stopped": 2, "cut_at_max_tokens": 1, "stop_rate": 0.6667}


class _TurnJudge:
    """A judge that grades the first turn 8 and the second 3, and records what it was shown."""

    name = "stub"
    scores_choices = False

    def __init__(self):
        self.seen = []

    def complete(self, convs, params, progress=False):
        from protege.teachers import TeacherResponse

        out = []
        for c in convs:
            text = c[-1]["content"]
            self.seen.append(text)
            grade = 3 if "answer in turn 2" in text else 8 if "answer in turn 1" in text else 6
            out.append(TeacherResponse(f"Rating: {grade}\nok"))
        return out

    def close(self):
        pass


def test_two_turn_prompts_are_graded_per_turn_in_context_with_per_category_means(tmp_path):
    """Issue 30 (two-turn judging, MT-bench): each turn is graded on its own, shown after the model's own
    earlier answer; summaries give per-turn and per-category means."""
    rows = [{"id": "q1", "category": "math", "turns": ["What is 2+2?", "And times 3?"], "answers": ["4", "12"]},
            {"id": "q2", "category": "writing", "turns": ["Write a line.", "Shorter."], "answers": ["A line.", "Line."]},
            {"id": "q3", "category": "math", "turns": ["What is 1+1?"], "answers": ["2"]}]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps({**r, "model": "m", "finish_reasons": ["stop"] * len(r["turns"])}) + "\n"
                            for r in rows))
    from protege.evaluate.judge import JudgeConfig, run

    judge = _TurnJudge()
    result = run(JudgeConfig(mode="single", answers=[str(path)], out_dir=str(tmp_path / "j"), calibration=0,
                             bootstrap_iters=50), teacher=judge)
    s = json.loads((tmp_path / "j" / "judge_results.json").read_text())["summary"]["m"]
    assert s["n"] == 5  # 2 + 2 turns + 1 single-turn prompt
    assert s["per_turn"] == {"0": {"mean": 6.0, "n": 1}, "1": {"mean": 8.0, "n": 2}, "2": {"mean": 3.0, "n": 2}}
    assert s["per_category"]["math"] == {"mean": (8 + 3 + 6) / 3, "n": 3}
    turn1 = next(t for t in judge.seen if "answer in turn 1" in t and "2+2" in t)
    turn2 = next(t for t in judge.seen if "answer in turn 2" in t and "2+2" in t)
    assert "And times 3?" not in turn1 and "12" not in turn1  # turn 1 is graded without what came after
    assert "Assistant A (turn 1): 4" in turn2 and "12" in turn2  # turn 2 in the context of the model's own answer
    assert result is not None
    whole = _TurnJudge()
    run(JudgeConfig(mode="single", answers=[str(path)], out_dir=str(tmp_path / "w"), calibration=0, per_turn=False,
                    bootstrap_iters=50), teacher=whole)
    assert len(whole.seen) == 3
