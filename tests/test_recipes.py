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
