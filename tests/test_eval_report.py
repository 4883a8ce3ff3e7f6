"""Report: style vs substance table, imitation gap, figures, escaping, and rendering in headless Chromium."""

from __future__ import annotations

import json
import math

import pytest

from protege.evaluate.verdicts import combine_orders, pairwise_summary


def _bench(path, name, wk, ar, fmt):
    path.mkdir(parents=True)
    tasks = {"world_knowledge": {"type": "multiple_choice", "n": 10, "acc": wk, "score": wk, "primary": "acc"},
             "arithmetic": {"type": "generate", "n": 10, "exact_match": ar, "score": ar, "primary": "exact_match"},
             "clickbait": {"type": "classify", "n": 10, "acc": 0.5, "format_adherence": fmt, "score": 0.5,
                           "primary": "acc"}}
    (path / "results.json").write_text(json.dumps({"model": name, "model_name": name, "tasks": tasks}))


def _judge(path, cand, opp, verdicts):
    path.mkdir(parents=True)
    rows = [{"id": str(i), "turns": [f"q{i} <b>bold?</b>"], "answers": [[f"{cand} says <script>x</script>"], [f"{opp} says hi"]],
             "length": [40, 20], "verdicts": list(v), "outcome": combine_orders(*v)} for i, v in enumerate(verdicts)]
    (path / "judgments.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "judge_results.json").write_text(json.dumps({
        "mode": "pairwise", "judge": "smollm2-135m-instruct", "models": [cand, opp],
        "mean_length": {cand: 40.0, opp: 20.0}, "summary": pairwise_summary(rows, iters=100)}))


@pytest.fixture()
def eval_dirs(tmp_path):
    _bench(tmp_path / "bench-base", "base-270m", 0.40, 0.10, 0.20)
    _bench(tmp_path / "bench-student", "student-400", 0.38, 0.10, 0.90)
    _bench(tmp_path / "bench-teacher", "teacher", 0.60, 0.30, 0.95)
    _judge(tmp_path / "judge-base", "base-270m", "teacher", [("B", "A")] * 3 + [("A", "A")])
    _judge(tmp_path / "judge-student", "student-400", "teacher", [("A", "B")] * 2 + [("A", "A")] * 2)
    return tmp_path


def test_model_table_and_imitation_gap(eval_dirs):
    from protege.report import collect, model_table

    t = model_table(collect([str(eval_dirs)]), base="base-270m", teacher=None)
    assert t["teacher"] == "teacher"  # the usual pairwise opponent
    rows = {r["model"]: r for r in t["rows"]}
    assert [r["role"] for r in t["rows"]] == ["base", "student", "teacher"]
    assert rows["base-270m"]["style"] == pytest.approx(0.125)  # 3 losses + 1 tie
    assert rows["student-400"]["style"] == pytest.approx(0.75)  # 2 wins + 2 ties
    assert rows["teacher"]["style"] == 0.5
    assert rows["student-400"]["format_adherence"] == pytest.approx(0.9)
    # substance = mean of the three task scores; gap = style gain - substance gain vs the base
    sub_gain = (0.38 + 0.10 + 0.5) / 3 - (0.40 + 0.10 + 0.5) / 3
    assert rows["student-400"]["gap"] == pytest.approx((0.75 - 0.125) - sub_gain)
    assert rows["base-270m"]["gap"] == 0


def test_judge_sides_are_inverted_when_the_model_was_the_opponent(tmp_path):
    from protege.report import collect, model_table

    _judge(tmp_path / "j", "teacher", "student", [("A", "B")] * 3 + [("B", "A")])  # teacher wins 3 of 4
    t = model_table(collect([str(tmp_path)]), base="student", teacher="teacher")
    student = next(r for r in t["rows"] if r["model"] == "student")
    assert student["style"] == pytest.approx(0.25)
    lo, hi = student["judge"]["ci"]
    assert lo <= 0.25 <= hi


def test_report_html_and_markdown(eval_dirs, tmp_path):
    from protege.report import ReportConfig, run

    out = tmp_path / "rep" / "report.html"
    r = run(ReportConfig(inputs=[str(eval_dirs)], output=str(out), base="base-270m"))
    page = out.read_text()
    assert r["figures"] == 3 and page.count("data:image/png;base64,") == 3
    assert "<script>x</script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page  # answers are escaped
    assert "imitation gap" in page and "position consistency" in page
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| student-400 | student |" in md and "position consistency" in md


def test_report_without_inputs_is_an_actionable_error(tmp_path):
    from protege.errors import StageError
    from protege.report import ReportConfig, run

    with pytest.raises(StageError, match="no results.json"):
        run(ReportConfig(inputs=[str(tmp_path)], output=str(tmp_path / "r.html")))
    with pytest.raises(StageError, match="not found"):
        run(ReportConfig(inputs=[str(tmp_path / "missing")], output=str(tmp_path / "r.html")))


def test_report_cli(eval_dirs, tmp_path):
    from protege.cli import main

    out = tmp_path / "cli" / "report.html"
    assert main(["report", str(eval_dirs), "-o", str(out), "--base", "base-270m"]) == 0
    assert out.exists() and (out.parent / "report.md").exists()


def test_report_renders_in_headless_chromium(eval_dirs, tmp_path):
    from browser import headless_chromium

    from protege.report import ReportConfig, run

    out = tmp_path / "report.html"
    run(ReportConfig(inputs=[str(eval_dirs)], output=str(out), base="base-270m"))
    with headless_chromium(width=1280, height=2400) as driver:
        driver.get(out.as_uri())
        from selenium.webdriver.common.by import By

        table = driver.find_element(By.ID, "models")
        assert len(table.find_elements(By.TAG_NAME, "tr")) == 4  # header + 3 models
        images = driver.find_elements(By.TAG_NAME, "img")
        loaded = [img for img in images if driver.execute_script("return arguments[0].naturalWidth", img) > 0]
        assert len(loaded) >= 2
        shot = tmp_path / "report.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000


def _answers(path, name, answers, finish_reasons=None):
    path.mkdir(parents=True)
    rows = []
    for i, a in enumerate(answers):
        row = {"id": str(i), "category": "", "turns": [f"q{i}"], "answers": [a], "reference": None, "model": name}
        if finish_reasons is not None:  # None: a file written before finish_reasons existed
            row["finish_reasons"] = [finish_reasons[i]]
        rows.append(row)
    (path / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_stop_rate_per_model_with_n_and_cut_answers_marked(tmp_path):
    from protege.report import ReportConfig, collect, model_table, run

    _answers(tmp_path / "base", "base", ["a" * 10] * 4)  # old file: no reasons, so no stop rate
    _answers(tmp_path / "student", "student", ["ok", "ok", "ok", "and so on and so on"],
             ["stop", "stop", "stop", "length"])
    _answers(tmp_path / "teacher", "teacher", ["fine"] * 4, ["stop"] * 4)
    rows = {r["model"]: r for r in model_table(collect([str(tmp_path)]), base="base", teacher="teacher")["rows"]}
    assert rows["student"]["stop_rate"] == pytest.approx(0.75) and rows["student"]["stop_n"] == 4
    assert rows["teacher"]["stop_rate"] == 1.0
    assert rows["base"]["stop_n"] == 0 and math.isnan(rows["base"]["stop_rate"])

    out = tmp_path / "rep" / "report.html"
    run(ReportConfig(inputs=[str(tmp_path / d) for d in ("base", "student", "teacher")], output=str(out),
                     base="base", teacher="teacher", samples=4))
    page = out.read_text()
    assert "stop rate" in page and "0.750 <span class=ci>n=4</span>" in page
    assert page.count("[cut at max_new_tokens]") == 1  # only the student's fourth answer
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| student | student | – | – | 6 | 0.750 (4) |" in md
    assert "| base | base | – | – | 10 | – |" in md


def test_single_grading_breakdown_per_turn_and_category_in_both_renderings():
    """MT-bench's view: a row per model, the mean grade per turn and per category (turn 0, a whole-dialogue
    grade, is not a column); pairwise results show the win rate per category; one-turn, uncategorised sets none."""
    from protege.report.render import breakdown, judge_section, markdown

    single = {"mode": "single", "judge": "j", "summary": {
        "a": {"mean_rating": 5.0, "mean_rating_ci": [4, 6], "length_rating_corr": 0.1, "error_rate": 0.0,
              "per_turn": {"1": {"mean": 4.0, "n": 2}, "2": {"mean": 6.0, "n": 2}},
              "per_category": {"math": {"mean": 3.0, "n": 2}, "writing": {"mean": 7.0, "n": 2}}},
        "b": {"mean_rating": 2.0, "mean_rating_ci": [1, 3], "length_rating_corr": 0.0, "error_rate": 0.0,
              "per_turn": {"1": {"mean": 2.0, "n": 2}, "2": {"mean": 2.0, "n": 2}},
              "per_category": {"math": {"mean": 1.0, "n": 2}}}}}
    head, rows = breakdown(single)
    assert head == ["model", "turn 1", "turn 2", "math", "writing"]
    assert rows == [["a", "4.00", "6.00", "3.00", "7.00"], ["b", "2.00", "2.00", "1.00", "–"]]
    assert "<th>turn 2</th>" in judge_section([single])
    md = markdown("t", {"rows": [], "tasks": [], "headlines": {}}, [single])
    assert "| model | turn 1 | turn 2 | math | writing |" in md and "a 5.00 [4.00, 6.00]" in md
    plain = {"mode": "single", "judge": "j", "summary": {"a": {**single["summary"]["a"], "per_turn": {"0": {"mean": 5, "n": 1}},
                                                          "per_category": {"": {"mean": 5, "n": 1}}}}}
    assert breakdown(plain) == ([], [])
