"""The shipped recipes and train configs validate: a typo in one fails here, not an hour into a run."""

from __future__ import annotations

from pathlib import Path

import pytest

from protege.config import load_config
from protege.pipeline import load_recipe, run_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TRAIN_CONFIGS = {"grpo-arithmetic.yaml": "grpo", "ppo-arithmetic.yaml": "ppo", "rs-arithmetic.yaml": "rs"}
SWEEP_CONFIGS = {"false-promise.yaml"}  # `protege sweep --config`


@pytest.mark.parametrize("name,method", sorted(TRAIN_CONFIGS.items()))
def test_rl_configs_validate_against_their_trainer(name, method):
    from protege.train import grpo, ppo, rs

    cls = {"grpo": grpo.GRPOConfig, "ppo": ppo.PPOConfig, "rs": rs.RSConfig}[method]
    cfg = load_config(cls, RECIPES / name)
    assert Path(cfg.prompts).is_file() or (RECIPES.parent / cfg.prompts).is_file()
    assert cfg.gold is not None  # every shipped RL config measures over-optimisation against a gold scorer


@pytest.mark.parametrize("path", sorted(p.name for p in RECIPES.glob("*.yaml") if p.name not in {*TRAIN_CONFIGS, *SWEEP_CONFIGS}))
def test_pipeline_recipes_load_and_plan(path, tmp_path, monkeypatch):
    monkeypatch.chdir(RECIPES.parent)
    recipe = load_recipe(RECIPES / path, sets=[f"runs_dir={tmp_path / 'runs'}"])
    rows = run_recipe(recipe, dry_run=True)
    assert rows and all(r["status"] == "would run" for r in rows)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", sorted(SWEEP_CONFIGS))
def test_sweep_configs_validate(name):
    from protege.sweep import SweepConfig

    load_config(SweepConfig, RECIPES / name)


@pytest.mark.slow
def test_alpaca_recipe_runs_end_to_end_cut_down(tmp_path, tiny_llama_dir, monkeypatch):
    """Issue 30: every stage of recipes/alpaca.yaml, wired as shipped, on a scripted OpenAI teacher (loopback)
    and the tiny model in every model's place, with tiny limits; only sizes and models are overridden."""
    import json

    from fake_openai_server import FakeServer

    monkeypatch.chdir(RECIPES.parent)
    server = FakeServer()
    tiny = str(tiny_llama_dir)
    sets = [f"runs_dir={tmp_path / 'runs'}", "pull.aliases=[]", "selfinstruct.n=6", "selfinstruct.teacher.backend=openai",
            "selfinstruct.teacher.model=scripted", f"selfinstruct.teacher.base_url={server.url}",
            "selfinstruct.teacher.backoff_base=0.01", "sample-40.n=3"]
    for stage in ("sft-40", "sft-all"):
        sets += [f"{stage}.model={tiny}", f"{stage}.max_steps=2", f"{stage}.max_length=64"]
    for stage in ("bench-base", "bench-40", "bench-all"):
        sets += [f"{stage}.limit=2"] + ([f"{stage}.model={tiny}"] if stage == "bench-base" else [])
    for stage in ("answers-teacher", "answers-base", "answers-40", "answers-all"):
        sets += [f"{stage}.limit=3", f"{stage}.max_new_tokens=8"]
        sets += [f"{stage}.model={tiny}"] if stage in ("answers-teacher", "answers-base") else []
    for stage in ("judge-base", "judge-40", "judge-all"):
        sets += [f"{stage}.judge.model={tiny}", f"{stage}.limit=2", f"{stage}.calibration=2"]
    try:
        rows = run_recipe(load_recipe(RECIPES / "alpaca.yaml", sets=sets))
    finally:
        server.close()
    assert [r["status"] for r in rows] == ["ran"] * len(rows), rows
    run = tmp_path / "runs" / "alpaca"
    kept = [json.loads(x) for x in (run / "03-curate" / "records.jsonl").read_text().splitlines()]
    assert kept and all(r["messages"][-1]["role"] == "assistant" for r in kept)
    report = (run / "17-report" / "report.md").read_text()
    assert "student-40" in report and "student-all" in report
