"""distill, orca and self-chat against the scripted loopback teacher (and the tiny local model)."""

from __future__ import annotations

import json

import pytest

from protege.cli import main as cli_main
from protege.errors import StageError
from protege.generate import distill, orca, selfchat
from protege.generate.common import GeneratorRun
from protege.generate.orca import TASK_TYPES, assign_system_message, load_system_messages, task_type
from protege.generate.selfchat import clean_turn, load_topics
from protege.formats import validate_source
from protege.records import RecordError

from fake_openai_server import FakeServer


@pytest.fixture(scope="module")
def scripted():
    s = FakeServer()
    yield s
    s.close()


def _teacher(url: str, model: str = "scripted") -> dict:
    return {"backend": "openai", "model": model, "base_url": url, "backoff_base": 0.01}


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "old answer"},
                      {"role": "user", "content": "And times three?"}], "source": "mine", "meta": {"k": 1}},
        {"instruction": "Translate to French", "input": "good night", "output": "bonne nuit"},
        {"conversations": [{"from": "human", "value": "Write a haiku about rain"}, {"from": "gpt", "value": "x"}]},
        {"messages": [{"role": "user", "content": "Tell me EMPTY"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is ice slippery?"},
                      {"role": "assistant", "content": "old"}, {"role": "user", "content": "EMPTY again"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_distill_answers_turn_by_turn_with_own_answers_in_context(scripted, prompts, tmp_path):
    out = tmp_path / "d"
    counts = distill.run(distill.DistillConfig(prompts=str(prompts), out_dir=str(out), teacher=_teacher(scripted.url),
                                               chunk_size=2, progress=False))
    rows = _rows(out / "records.jsonl")
    assert counts["records"] == len(rows) == 4 and counts["rejected"]["empty_answer"] == 1
    assert counts["truncated_conversations"] == 1 and validate_source(out / "records.jsonl")[1] == []
    first = rows[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant", "user", "assistant"]
    assert first[1]["content"].startswith("(turn 1") and "old answer" not in json.dumps(first)
    assert first[3]["content"].startswith("(turn 2")  # the teacher saw its own first answer
    assert rows[0]["meta"]["k"] == 1 and rows[0]["meta"]["prompt_source"] == "mine"
    assert rows[1]["messages"][0]["content"] == "Translate to French\n\ngood night"
    assert rows[3]["messages"][0] == {"role": "system", "content": "Be brief."} and len(rows[3]["messages"]) == 3
    assert json.loads((out / "manifest.json").read_text())["counts"]["records"] == 4
    again = distill.run(distill.DistillConfig(prompts=str(prompts), out_dir=str(out), teacher=_teacher(scripted.url),
                                              progress=False))
    assert again["teacher"]["sent"] == 0 and _rows(out / "records.jsonl") == rows


def test_distill_max_turns_limit_and_system_prompt(scripted, prompts, tmp_path):
    counts = distill.run(distill.DistillConfig(prompts=str(prompts), out_dir=str(tmp_path), max_turns=1, limit=2,
                                               system_prompt="You are terse.", teacher=_teacher(scripted.url),
                                               progress=False))
    rows = _rows(tmp_path / "records.jsonl")
    assert counts["prompts"] == 2 and [len(r["messages"]) for r in rows] == [3, 3]
    assert rows[0]["messages"][0] == {"role": "system", "content": "You are terse."}
    assert "sys You are ters" in rows[0]["messages"][2]["content"]


def test_distill_bad_inputs(tmp_path):
    with pytest.raises(StageError, match="no prompt set"):
        distill.run(distill.DistillConfig(out_dir=str(tmp_path)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "ok"}]}\n{"messages": [{"role": "robot"}]}\n')
    with pytest.raises(RecordError, match="bad.jsonl:2"):
        distill.run(distill.DistillConfig(prompts=str(bad), out_dir=str(tmp_path / "o")))


def test_generator_progress_aborts_the_run_on_any_exception(tmp_path):
    gen = GeneratorRun("generate.test", distill.DistillConfig(), tmp_path)
    with gen.progress(2, "test", "conv", show=False) as bar:
        assert bar is None
    gen.writer.write({"ok": 1})  # a body that ends normally leaves the run open for `finish`
    with pytest.raises(KeyboardInterrupt), gen.progress(2, "test", "conv") as bar:
        bar.update(1)
        raise KeyboardInterrupt
    assert bar.disable  # tqdm's close() disables the bar
    with pytest.raises(ValueError, match="closed file"):
        gen.writer.write({"late": 1})
    assert _rows(tmp_path / "records.jsonl") == [{"ok": 1}]


def test_task_types_and_system_messages():
    msgs = load_system_messages()
    assert len(msgs) >= 12 and len({m["id"] for m in msgs}) == len(msgs)
    assert task_type("Which of the following is a mammal?\nA) shark\nB) whale") == "multiple_choice"
    assert task_type("Write a Python function to reverse a list") == "code"
    assert task_type("What is 17 * 23?") == "math"
    assert task_type("Translate 'cat' into German") == "translation"
    assert task_type("Summarize this paragraph: ...") == "summarization"
    assert task_type("Classify the sentiment of: I loved it") == "classification"
    assert task_type("Extract the names in: Ann met Bo") == "extraction"
    assert task_type("Rewrite this more politely: give it") == "rewrite"
    assert task_type("Write a poem about autumn") == "creative"
    assert task_type("Why do birds migrate?") == "reasoning"
    assert task_type("Who painted the Mona Lisa?") == "open_qa"
    kind, m = assign_system_message("id1", "Which of the following is red? A) sky B) blood", msgs)
    assert kind == "multiple_choice" and "multiple_choice" in m["task_types"]
    picks = {assign_system_message(f"id{i}", "What is 3 + 4?", msgs)[1]["id"] for i in range(40)}
    assert len(picks) >= 3  # spread over the math messages, stable per prompt id
    assert assign_system_message("x", "What is 3 + 4?", msgs) == assign_system_message("x", "What is 3 + 4?", msgs)
    assert set(TASK_TYPES) == {t for m in msgs for t in m["task_types"]}


@pytest.mark.parametrize("load, text, error", [
    (load_system_messages, "- id: a\n  task_types: [math, nonsense]\n  text: hi\n", "unknown task types"),
    (load_system_messages, "- id: a\n  task_types: [math]\n  text: hi\n", "no system message for task type"),
    (load_topics, "just a string\n", "YAML list"),
    (load_topics, "[]\n", "no topics"),
])
def test_bad_data_files(tmp_path, load, text, error):
    bad = tmp_path / "data.yaml"
    bad.write_text(text)
    with pytest.raises(StageError, match=error):
        load(str(bad))


def test_orca_single_and_progressive(scripted, prompts, tmp_path):
    single = orca.run(orca.OrcaConfig(prompts=str(prompts), out_dir=str(tmp_path / "one"), teacher=_teacher(scripted.url),
                                      progress=False))
    rows = _rows(tmp_path / "one" / "records.jsonl")
    assert single["records"] == len(rows) == 4  # one prompt opens with EMPTY; Orca answers only the first turn
    assert all(r["messages"][0]["role"] == "system" and len(r["messages"]) == 3 for r in rows)
    assert {r["meta"]["task_type"] for r in rows} >= {"math", "translation"}
    assert rows[0]["meta"]["system_message_id"] and "sys " in rows[0]["messages"][2]["content"]
    teachers = [_teacher(scripted.url), _teacher(scripted.url) | {"model": "scripted"}]
    prog = orca.run(orca.OrcaConfig(prompts=str(prompts), out_dir=str(tmp_path / "prog"), teachers=teachers,
                                    stage_limits=[0, 2], progress=False))
    s1, s2 = (_rows(tmp_path / "prog" / f"stage{k}" / "records.jsonl") for k in (1, 2))
    assert len(s1) == 4 and len(s2) == 2 and prog["records"] == 6
    assert [r["meta"]["stage"] for r in _rows(tmp_path / "prog" / "records.jsonl")] == [1, 1, 1, 1, 2, 2]
    assert json.loads((tmp_path / "prog" / "manifest.json").read_text())["counts"]["stages"][1]["prompts"] == 2
    assert json.loads((tmp_path / "prog" / "stage2" / "manifest.json").read_text())["stage"] == "generate.orca.stage2"
    with pytest.raises(StageError, match="one per teacher"):
        orca.run(orca.OrcaConfig(prompts=str(prompts), out_dir=str(tmp_path / "x"), teachers=teachers, stage_limits=[1]))


def test_clean_turn_and_topics():
    assert clean_turn("Person: How so?\nAssistant: Because.") == "How so?"
    assert clean_turn('  "[Human]: Hello there"  ') == "Hello there"
    assert clean_turn("") == ""
    assert clean_turn("[AI] Sure thing.\n[Human] Thanks") == "Sure thing."
    assert len(load_topics(None)) >= 50


def test_self_chat_turn_limit_end_and_degenerate(scripted, tmp_path):
    topics = tmp_path / "topics.yaml"
    topics.write_text("- How do tides work?\n- Please stop early. What is rust?\n- LOOP forever\n")
    cfg = selfchat.SelfChatConfig(out_dir=str(tmp_path / "o"), topics=str(topics), teacher=_teacher(scripted.url),
                                  max_turns=3, progress=False)
    counts = selfchat.run(cfg)
    rows = _rows(tmp_path / "o" / "records.jsonl")
    assert counts["records"] == len(rows) == 2 and counts["rejected"]["no_usable_answer"] == 1
    assert validate_source(tmp_path / "o" / "records.jsonl")[1] == []
    by_topic = {r["meta"]["topic"]: r for r in rows}
    tides = by_topic["How do tides work?"]["messages"]
    assert [m["role"] for m in tides] == ["user", "assistant"] * 3 and tides[2]["content"].startswith("Interesting")
    assert by_topic["Please stop early. What is rust?"]["meta"]["stop_reason"] == "user_ended"
    assert counts["stop_reasons"]["assistant_repetitive"] == 1 and counts["stop_reasons"]["turn_limit"] == 1
    again = selfchat.run(cfg)
    assert again["teacher"]["sent"] == 0 and _rows(tmp_path / "o" / "records.jsonl") == rows


def test_self_chat_with_tiny_local_model_and_cli(tiny_llama_dir, tmp_path):
    topics = tmp_path / "topics.jsonl"
    topics.write_text('{"topic": "Tell me about the sea."}\n{"topic": "What is two plus three?"}\n')
    code = cli_main(["generate", "self-chat", f"--topics={topics}", f"--out_dir={tmp_path / 'o'}", "--max_turns=2",
                     "--max_new_tokens=8", f"--teacher.model={tiny_llama_dir}", "--n=3", "--progress=false"])
    assert code == 0
    counts = json.loads((tmp_path / "o" / "manifest.json").read_text())["counts"]
    assert counts["conversations"] == 3 and counts["records"] + counts["rejected"]["no_usable_answer"] == 3
    assert validate_source(tmp_path / "o" / "records.jsonl")[1] == []
