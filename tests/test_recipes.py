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


def _cut_down(recipe, tiny: str, teacher_url: str, generators: dict[str, list[str]]) -> list[str]:
    """`--set`s that run a shipped recipe in seconds: generators on the scripted loopback teacher, the tiny
    model in every other model's place, tiny limits. Stage wiring, kinds and `${...}` references stay as shipped."""
    sets = ["pull.aliases=[]"]
    by_name = {s.name: s for s in recipe.stages}
    for stage, extra in generators.items():
        config = by_name[stage].config
        keys = ([f"teachers.{i}" for i in range(len(config["teachers"]))] if "teachers" in config
                else ["policy"] if "policy" in config else ["teacher"])
        for key in keys:
            sets += [f"{stage}.{key}.backend=openai", f"{stage}.{key}.model=scripted",
                     f"{stage}.{key}.base_url={teacher_url}", f"{stage}.{key}.backoff_base=0.01"]
        sets += extra
    for spec in recipe.stages:
        model = spec.config.get("model")
        local = isinstance(model, str) and "${" not in model
        if spec.kind in ("train.sft", "train.rm"):
            sets += [f"{spec.name}.model={tiny}", f"{spec.name}.max_steps=2", f"{spec.name}.max_length=160"]
        elif spec.kind == "eval.bench":
            sets += [f"{spec.name}.limit=2"] + ([f"{spec.name}.model={tiny}"] if local else [])
        elif spec.kind == "eval.answer":
            sets += [f"{spec.name}.limit=3", f"{spec.name}.max_new_tokens=8"] + ([f"{spec.name}.model={tiny}"] if local else [])
        elif spec.kind == "eval.judge" and spec.config.get("mode") == "single":  # two-turn grading prompts are
            sets += [f"{spec.name}.judge.backend=openai", f"{spec.name}.judge.model=grader",  # longer than the tiny
                     f"{spec.name}.judge.base_url={teacher_url}", f"{spec.name}.limit=2",  # model's 512 positions
                     f"{spec.name}.calibration=2"]
        elif spec.kind == "eval.judge":
            sets += [f"{spec.name}.judge.model={tiny}", f"{spec.name}.limit=2", f"{spec.name}.calibration=2"]
        elif spec.kind == "curate":  # steps that load a tokenizer (split) count with the tiny model's
            sets += [f"{spec.name}.steps.{i}.model={tiny}" for i, step in enumerate(spec.config.get("steps", []))
                     if isinstance(step, dict) and "${" not in str(step.get("model", "${"))]
    return sets


@pytest.mark.slow
@pytest.mark.parametrize("name,generators,students", [
    ("alpaca", {"selfinstruct": ["selfinstruct.n=6"]}, ["student-40", "student-all"]),
    ("instruct", {"selfchat": ["selfchat.n=4"], "distill": ["distill.limit=4"]}, ["selfchat", "distill"]),
    ("vicuna", {"conversations": ["conversations.limit=4"]}, ["vicuna", "turn 2"]),
    ("orca", {"explain": ["explain.limit=6", "explain.stage_limits=[0,3]"], "plain": ["plain.limit=6"]},
     ["orca", "plain"]),
    # The scripted policy answers a COIN prompt by its seed, ending its turn or not: pairs with a known truth.
    ("koala", {"distill": ["distill.limit=6"], "pairs": ["pairs.limit=4", "pairs.prompts={tmp}/coin.jsonl"]},
     ["koala-distill", "koala-all"]),
    ("lima", {"distill": ["distill.limit=6"], "pairs": ["pairs.limit=4", "pairs.prompts={tmp}/coin.jsonl"]},
     ["lima-k", "random-k"]),
])
def test_recipes_run_end_to_end_cut_down(tmp_path, tiny_llama_dir, monkeypatch, name, generators, students):
    """Issue 30: every stage of a seed recipe, wired as shipped, on a scripted OpenAI teacher (loopback) and
    the tiny model in every model's place, with tiny limits; only sizes and models are overridden."""
    import json

    from fake_openai_server import FakeServer

    monkeypatch.chdir(RECIPES.parent)
    server = FakeServer()
    try:
        recipe = load_recipe(RECIPES / f"{name}.yaml")
        (tmp_path / "coin.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Flip a COIN "
                                                                 f"for {i}"}]}) + "\n" for i in range(4)))
        generators = {k: [x.replace("{tmp}", str(tmp_path)) for x in v] for k, v in generators.items()}
        sets = [f"runs_dir={tmp_path / 'runs'}", *_cut_down(recipe, str(tiny_llama_dir), server.url, generators)]
        rows = run_recipe(load_recipe(RECIPES / f"{name}.yaml", sets=sets))
    finally:
        server.close()
    assert [r["status"] for r in rows] == ["ran"] * len(rows), rows
    run = tmp_path / "runs" / name
    for folder in run.glob("*-curate*"):
        kept = [json.loads(x) for x in (folder / "records.jsonl").read_text().splitlines()]
        assert kept and all(r["messages"][-1]["role"] == "assistant" for r in kept)
    if name == "koala":  # Koala-All's model folder carries its positive marker for serve / eval answer / chat
        meta = json.loads((next(run.glob("*-sft-all")) / "merged" / "protege_chat.json").read_text())
        assert meta["marker"] == {"positive": "<|good|>", "placement": "system"}
    report = next(run.glob("*-report")) / "report.md"
    assert all(s in report.read_text() for s in students)
