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


def _user_files(tmp: Path) -> dict[str, Path]:
    """Files in the formats users bring, none of which the recipes have seen: a ShareGPT dump (scraped HTML,
    one conversation too long for the budget), Alpaca instructions, Anthropic HH pairs, FastChat questions."""
    import json

    topics = ["the ocean tides", "how bread rises", "why leaves change colour", "how bicycles balance"]
    long_turns = []
    for topic in topics:
        long_turns += [{"from": "human", "value": f"Can you tell me in a few sentences about {topic}?"},
                       {"from": "gpt", "value": f"Of course. People have wondered about {topic} for a long time, and "
                                                "the short answer involves a little physics and a little chemistry. "
                                                "Scientists explain it with simple experiments you can try at home."}]
    sharegpt = [{"id": "html", "conversations": [
                    {"from": "human", "value": "How do I list the files in a folder?"},
                    {"from": "gpt", "value": "<p>Use the <code>ls</code> command:</p><pre><code>ls -la\n</code></pre>"}]},
                {"id": "long", "conversations": long_turns}]
    alpaca = [{"instruction": f"Name a colour that goes well with {c}.", "input": "", "output": f"Grey goes well with {c}."}
              for c in ("red", "green", "blue", "yellow")]
    hh = [{"chosen": f"\n\nHuman: Is {i} an even number?\n\nAssistant: {'Yes' if i % 2 == 0 else 'No'}, it is.",
           "rejected": f"\n\nHuman: Is {i} an even number?\n\nAssistant: Let me tell you a story instead."}
          for i in range(4)]
    questions = [{"question_id": i, "category": c, "turns": [f"Tell me about {c}.", "Say it shorter."]}
                 for i, c in enumerate(["writing", "math"])]
    files = {"sharegpt": tmp / "sharegpt.json", "alpaca": tmp / "alpaca.json", "hh": tmp / "hh.jsonl",
             "questions": tmp / "question.jsonl"}
    files["sharegpt"].write_text(json.dumps(sharegpt))
    files["alpaca"].write_text(json.dumps(alpaca))
    files["hh"].write_text("".join(json.dumps(r) + "\n" for r in hh))
    files["questions"].write_text("".join(json.dumps(r) + "\n" for r in questions))
    return files


@pytest.mark.slow
def test_recipes_run_on_user_files_in_their_formats(tmp_path, tiny_llama_dir, monkeypatch):
    """Issue 30: the generation stages skipped, the user's own ShareGPT / Alpaca / HH / FastChat files in their
    place; a bad line in a user's file is named by file:line."""
    import json

    from fake_openai_server import FakeServer
    from protege.errors import UserError

    monkeypatch.chdir(RECIPES.parent)
    files = _user_files(tmp_path)
    tiny = str(tiny_llama_dir)
    server = FakeServer()  # the single-grading judge (model `grader`)
    try:
        vicuna = load_recipe(RECIPES / "vicuna.yaml")
        sets = [f"runs_dir={tmp_path / 'runs'}", *_cut_down(vicuna, tiny, server.url, {}),
                f"sharegpt.src={files['sharegpt']}", "curate.steps.4.max_tokens=120",
                *[f"{s}.prompts={files['questions']}" for s in ("answers-teacher", "answers-base", "answers-vicuna")]]
        rows = run_recipe(load_recipe(RECIPES / "vicuna.yaml", sets=sets), skip=["conversations"])
    finally:
        server.close()
    assert rows[1]["status"] == "left out" and all(r["status"] == "ran" for r in rows[2:]), rows
    run = tmp_path / "runs" / "vicuna"
    kept = [json.loads(x) for x in (run / "04-curate" / "records.jsonl").read_text().splitlines()]
    html = next(r for r in kept if r["messages"][0]["content"].startswith("How do I list"))
    assert "ls -la" in html["messages"][1]["content"] and "<pre>" not in html["messages"][1]["content"]
    pieces = [r for r in kept if "tell me in a few sentences" in r["messages"][0]["content"]]
    assert len(pieces) > 1 and all(p["messages"][0]["role"] == "user" and p["messages"][-1]["role"] == "assistant"
                                   for p in pieces)  # cut at turn boundaries
    answered = [json.loads(x) for x in (run / "10-answers-vicuna" / "answers.jsonl").read_text().splitlines()]
    assert [len(a["answers"]) for a in answered] == [2, 2] and answered[1]["category"] == "math"

    koala = load_recipe(RECIPES / "koala.yaml")
    sets = [f"runs_dir={tmp_path / 'runs'}", *_cut_down(koala, tiny, "http://127.0.0.1:9/v1", {}),
            f"distilled.src={files['sharegpt']}", f"instructions.src={files['alpaca']}",
            f"preferences.src={files['hh']}"]
    for stage in ("distilled", "instructions", "preferences", "curate-all"):
        run_recipe(load_recipe(RECIPES / "koala.yaml", sets=sets), only=stage, skip=["distill", "pairs"])
    mixed = [json.loads(x) for x in (tmp_path / "runs" / "koala" / "08-curate-all" / "records.jsonl").read_text().splitlines()]
    assert {r["source"] for r in mixed} == {"distill", "alpaca", "pairs"}  # named by the recipe, not the files
    marked = [r for r in mixed if r["source"] == "pairs"]
    assert marked and {r["messages"][0]["content"] for r in marked} == {"<|good|>", "<|bad|>"}

    files["hh"].write_text(files["hh"].read_text() + '{"chosen": "no turns here", "rejected": "none"}\n')
    with pytest.raises(UserError, match=r"hh.jsonl:5"):
        run_recipe(load_recipe(RECIPES / "koala.yaml", sets=sets), only="preferences", skip=["distill", "pairs"])
