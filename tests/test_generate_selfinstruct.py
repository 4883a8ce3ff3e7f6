"""Self-Instruct: seed pool, reply parsing (incl. malformed replies), filters, the loop end to end."""

from __future__ import annotations

import json

import pytest

from protege.cli import main as cli_main
from protege.generate.common import data_file
from protege.generate.selfinstruct import (SelfInstructConfig, Task, chat_task_prompt, completion_task_prompt,
                                           parse_tasks, run, task_problem)
from protege.generate.text import RougePool
from protege.formats import validate_source

from fake_openai_server import FakeServer


@pytest.fixture(scope="module")
def scripted():
    s = FakeServer()
    yield s
    s.close()


def _teacher(url: str) -> dict:
    return {"backend": "openai", "model": "scripted", "base_url": url, "backoff_base": 0.01}


def test_seed_tasks_are_many_diverse_and_well_formed():
    rows = [json.loads(line) for line in data_file("seed_tasks.jsonl").read_text().splitlines()]
    assert len(rows) >= 100
    assert len({r["instruction"] for r in rows}) == len(rows)
    assert all(r["instruction"].strip() and r["output"].strip() for r in rows)
    assert sum(1 for r in rows if r["input"]) >= 30 and sum(1 for r in rows if r["is_classification"]) >= 15
    assert len({r["instruction"].split()[0].lower() for r in rows}) >= 40  # many different verbs


def test_parse_numbered_bulleted_labelled_and_inputs():
    reply = ("Sure! Here are five tasks:\n4. Instruction: 4. Rewrite the email politely.\nInput: send it now\n"
             "Output: Could you send it?\n5) **Task:** Name a planet with rings.\n- Tell a joke about owls.\n"
             "Instructions:\n6. Input: none\nSome closing remark.")
    tasks = parse_tasks(reply)
    assert tasks == [Task("Rewrite the email politely.", "send it now"), Task("Name a planet with rings."),
                     Task("Tell a joke about owls.")]


@pytest.mark.parametrize("reply", ["", "   \n\n", "I cannot help with that.", "1.\n2.\n3.", "Output: 42",
                                   "\x00\x01 garbage \ufffd", "Here is a list:"])
def test_malformed_replies_give_no_tasks_and_never_raise(reply):
    assert parse_tasks(reply) == []


def test_parse_completion_reply_takes_leading_text_and_caps_count():
    assert parse_tasks(" Plan a picnic.\nTask 9: Name two rivers.", leading=True) == [Task("Plan a picnic."),
                                                                                      Task("Name two rivers.")]
    assert len(parse_tasks("\n".join(f"{i}. Task number {i} here" for i in range(1, 40)))) == 10


def test_filters_name_their_reason():
    cfg = SelfInstructConfig()
    pool = RougePool(["Give three practical tips for falling asleep faster."])
    seen: set[str] = set()
    assert task_problem(Task("Do it."), pool, seen, cfg) == "too_short"
    assert task_problem(Task("word " * 200), pool, seen, cfg) == "too_long"
    assert task_problem(Task("Describe the attached image in detail."), pool, seen, cfg) == "needs_non_text_modality"
    assert task_problem(Task("Summarize the text below", "see the file below"), pool, seen, cfg) == "needs_non_text_modality"
    assert task_problem(Task("?? what is this thing"), pool, seen, cfg) == "bad_first_character"
    assert task_problem(Task("Give three practical tips for falling asleep quickly."), pool, seen, cfg) == "similar_to_pool"
    assert task_problem(Task("Explain how tides are caused by the moon."), pool, seen, cfg) is None


def test_prompts_list_examples():
    ex = [Task("Name a color."), Task("Translate it.", "hola")]
    assert "1. Name a color.\n2. Translate it.\nInput: hola" in chat_task_prompt(ex, 5)
    assert "numbered 3 to 7" in chat_task_prompt(ex, 5)
    assert completion_task_prompt(ex).endswith("Task 1: Name a color.\nTask 2: Translate it.\nInput: hola\nTask 3:")


def _check_run(out, counts, n):
    assert counts["kept"] == counts["records"] == n
    assert counts["generated"] == counts["kept"] + sum(counts["rejected"].values())
    good, errors, _ = validate_source(out / "records.jsonl")
    assert good == n and not errors
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len({r["id"] for r in rows}) == n
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["kept"] == n and manifest["teacher"].startswith("openai:scripted@")
    return rows


@pytest.mark.parametrize("mode", ["chat", "completion"])
def test_end_to_end_counts_add_up_and_rerun_is_all_cache_hits(scripted, tmp_path, mode):
    out = tmp_path / mode
    cfg = SelfInstructConfig(out_dir=str(out), n=24, teacher=_teacher(scripted.url), prompt_mode=mode,
                             requests_per_round=4, progress=False)
    counts = run(cfg)
    rows = _check_run(out, counts, 24)
    assert counts["rejected"].get("similar_to_pool", 0) + counts["rejected"].get("duplicate", 0) > 0
    assert counts["rejected"].get("needs_non_text_modality", 0) > 0 and counts["rejected"].get("too_short", 0) > 0
    assert counts["teacher"]["cache_hits"] == 0
    again = run(cfg)  # same command again: replayed from the cache, identical records, nothing sent
    assert again["teacher"]["sent"] == 0 and again["teacher"]["cache_hits"] == again["teacher"]["requests"]
    assert _check_run(out, again, 24) == rows


def test_partial_run_then_larger_n_resumes_from_cache(scripted, tmp_path):
    base = dict(out_dir=str(tmp_path), teacher=_teacher(scripted.url), requests_per_round=2, progress=False)
    first = run(SelfInstructConfig(n=6, **base))
    second = run(SelfInstructConfig(n=15, **base))
    assert second["teacher"]["cache_hits"] >= first["task_requests"]
    _check_run(tmp_path, second, 15)


def test_weak_teacher_terminates_at_request_cap(tiny_llama_dir, tmp_path):
    cfg = SelfInstructConfig(out_dir=str(tmp_path), n=50, teacher={"model": str(tiny_llama_dir)}, max_requests=4,
                             requests_per_round=2, task_max_new_tokens=12, answer_max_new_tokens=6, progress=False)
    counts = run(cfg)
    assert counts["stopped"] == "max_requests" and counts["task_requests"] == 4 and counts["prompt_mode"] == "completion"
    assert counts["generated"] == counts["kept"] + sum(counts["rejected"].values())
    assert counts["malformed_replies"] + counts["generated"] > 0
    assert validate_source(tmp_path / "records.jsonl")[1] == []


def test_cli_runs_with_config_and_overrides(scripted, tmp_path, capsys):
    cfg = tmp_path / "si.yaml"
    cfg.write_text(f"n: 5\nprogress: false\nteacher:\n  backend: openai\n  model: scripted\n  base_url: {scripted.url}\n")
    assert cli_main(["generate", "self-instruct", "--config", str(cfg), f"--out_dir={tmp_path / 'o'}", "--seed=3"]) == 0
    assert "wrote 5 records" in capsys.readouterr().out
    assert cli_main(["generate", "self-instruct", "--config", str(cfg), "--nn=3"]) == 2
    assert "did you mean `n`" in capsys.readouterr().err


def test_bad_seed_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"instruction": "ok task here"}\n{"input": "no instruction"}\n')
    assert cli_main(["generate", "self-instruct", f"--seed_tasks={bad}", f"--out_dir={tmp_path / 'o'}"]) == 1
    assert "no `instruction`" in capsys.readouterr().err


@pytest.mark.slow
def test_builtin_teacher_small_run(tmp_path):
    """The default teacher (SmolLM2-135M-Instruct, local engine) end to end on a tiny budget."""
    from conftest import builtin_model

    builtin_model("smollm2-135m-instruct")
    cfg = SelfInstructConfig(out_dir=str(tmp_path), n=3, requests_per_round=2, max_requests=8, task_max_new_tokens=64,
                             answer_max_new_tokens=24, progress=False)
    counts = run(cfg)
    assert counts["prompt_mode"] == "chat" and counts["kept"] <= 3
    assert counts["generated"] == counts["kept"] + sum(counts["rejected"].values())
    assert validate_source(tmp_path / "records.jsonl")[:2] == (counts["kept"], [])
