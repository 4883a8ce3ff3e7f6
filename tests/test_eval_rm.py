"""eval rm: answer sets scored by a trained tiny RM; the report's RM column; bootstrap intervals."""

from __future__ import annotations

import json
import random

import pytest

from test_train_preference import rm_cfg, write_pairs


def write_answers(folder, model, good: bool, n=8):
    folder.mkdir(parents=True)
    rng = random.Random(1)
    with open(folder / "answers.jsonl", "w") as fh:
        for i in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            ans = f"{a} plus {b} is {a + b}." if good else f"I do not know, sorry {i}."
            fh.write(json.dumps({"id": str(i), "category": "", "turns": [f"What is {a} plus {b}?"], "answers": [ans],
                                 "finish_reasons": ["stop"], "reference": None, "model": model}) + "\n")
    return str(folder)


def test_eval_rm_ranks_answer_sets_and_report_shows_it(tmp_path, tiny_llama_dir):
    from protege.report import ReportConfig
    from protege.report import run as report
    from protege.evaluate.rm_score import RMScoreConfig, run
    from protege.train.rm import run as train_rm

    train_rm(rm_cfg(tmp_path, tiny_llama_dir, write_pairs(tmp_path / "pairs.jsonl")))
    good = write_answers(tmp_path / "a-good", "right", True)
    bad = write_answers(tmp_path / "a-bad", "refuses", False)
    means = run(RMScoreConfig(rm=str(tmp_path / "rm" / "model"), answers=[good, bad], out_dir=str(tmp_path / "scores")))
    assert means["right"] > means["refuses"]
    res = json.loads((tmp_path / "scores" / "right" / "rm_scores.json").read_text())
    assert res["n"] == 8 and res["ci"][0] <= res["mean"] <= res["ci"][1] and len(res["scores"]) == 8
    out = report(ReportConfig(inputs=[good, bad, str(tmp_path / "scores")], output=str(tmp_path / "r" / "report.html"),
                              base="refuses"))
    md = (tmp_path / "r" / "report.md").read_text()
    assert "RM score" in md and f"{means['right']:.3f}" in md
    assert "reward model score" in (tmp_path / "r" / "report.html").read_text()
    assert out["models"] == 2


def test_eval_rm_bad_input(tmp_path):
    from protege.errors import StageError
    from protege.evaluate.rm_score import RMScoreConfig, run
    from protege.models import ModelError

    with pytest.raises(StageError, match="answers` is empty"):
        run(RMScoreConfig(rm="x", answers=[], out_dir=str(tmp_path / "o")))
    with pytest.raises(ModelError, match="cannot load reward model|not found"):
        run(RMScoreConfig(rm=str(tmp_path / "nope"), answers=[str(tmp_path)], out_dir=str(tmp_path / "o")))


def test_bootstrap_interval_covers_the_true_mean():
    from protege.evaluate.intervals import bootstrap_ci

    covered = 0
    for seed in range(40):
        rng = random.Random(seed)
        values = [rng.gauss(1.0, 2.0) for _ in range(60)]
        lo, hi = bootstrap_ci(values, iters=400, seed=seed)
        covered += lo <= 1.0 <= hi
    assert covered >= 34  # nominal 95%: >= 85% of 40 seeds


def test_model_names_from_answer_files_cannot_leave_out_dir():
    from protege.evaluate.rm_score import _folder_name

    assert _folder_name("../../etc", 0) == "etc" and _folder_name("..", 3) == "model-3"
    assert _folder_name("runs/dpo/merged", 0) == "runs_dpo_merged"
