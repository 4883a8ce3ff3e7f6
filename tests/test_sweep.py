"""The False Promise sweep end to end on a tiny model: every point trained, benched, judged, plotted."""

from __future__ import annotations

import json

from protege.records import Conversation, write_records
from protege.sweep import SweepConfig, build_recipe, run


def _pool(tmp_path):
    pool = tmp_path / "pool.jsonl"
    write_records(pool, [Conversation([{"role": "user", "content": f"What is {i} plus {i}?"},
                                       {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}])
                         for i in range(12)])
    prompts = tmp_path / "prompts.jsonl"
    write_records(prompts, [Conversation([{"role": "user", "content": q}]) for q in ("Say hi.", "Name a colour.")])
    return pool, prompts


def test_recipe_shape(tmp_path):
    cfg = SweepConfig(pool="p.jsonl", sizes=[0, 8, 4], runs_dir=str(tmp_path))
    names = [s.name for s in build_recipe(cfg).stages]
    assert names[0] == "answers-teacher" and names[-1] == "bench-teacher"
    assert "sft-00000" not in names and names.index("sft-00004") < names.index("sft-00008")


def test_sweep_end_to_end(tmp_path, tiny_llama_dir):
    pool, prompts = _pool(tmp_path)
    model = str(tiny_llama_dir)
    cfg = SweepConfig(pool=str(pool), sizes=[0, 4, 8], student=model, teacher=model, prompts=str(prompts),
                      judge={"model": model}, tasks=["world_knowledge"], bench_limit=3, answer_max_new_tokens=8,
                      runs_dir=str(tmp_path / "runs"), sft={"max_steps": 3, "batch_size": 2, "max_length": 64})
    result = run(cfg)
    data = json.loads((tmp_path / "runs" / "false-promise" / "sweep.json").read_text())
    assert result["points"] == 3 and [p["n"] for p in data["points"]] == [0, 4, 8]
    for p in data["points"]:
        assert 0.0 <= p["substance"] <= 1.0
        lo, hi = p["substance_ci"]
        assert lo <= p["substance"] <= hi
        # judge-free style: the teacher's held-out answers scored under every point's model
        assert p["teacher_nll"] > 0 and p["teacher_nll_ci"][0] <= p["teacher_nll"] <= p["teacher_nll_ci"][1]
        # log-prob verdicts never fail to parse; a random tiny judge is calibrated and marked untrusted
        assert 0.0 <= p["judge_win_rate"] <= 1.0 and p["judge_trusted"] is False
    judged = sorted((tmp_path / "runs" / "false-promise").glob("*-judge-*/judge_results.json"))
    assert len(judged) == 3
    html = (tmp_path / "runs" / "false-promise" / "sweep.html").read_text()
    assert "<table id='sweep'>" in html and "data:image/png;base64," in html
    # a second run skips every finished stage
    again = run(cfg)
    assert again["points"] == 3
