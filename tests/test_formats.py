from __future__ import annotations

import json
import subprocess
import sys

import pytest

from protege.formats import (from_alpaca, from_openai, from_sharegpt, iter_source, to_alpaca, to_openai,
                             to_sharegpt)
from protege.records import Conversation, RecordError, read_records


def test_alpaca_round_trip():
    conv = from_alpaca({"instruction": "Summarise.", "input": "Long text.", "output": "Short."})
    assert conv.messages == [{"role": "user", "content": "Summarise.\n\nLong text."},
                             {"role": "assistant", "content": "Short."}]
    back = to_alpaca(conv)
    assert back["instruction"] == "Summarise.\n\nLong text." and back["output"] == "Short."
    multi = Conversation([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}])
    with pytest.raises(RecordError, match="one user/assistant pair"):
        to_alpaca(multi)


def test_sharegpt_round_trip_and_roles():
    obj = {"id": "sg1", "conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
                                          {"from": "gpt", "value": "hello"}]}
    conv = from_sharegpt(obj)
    assert conv.id == "sg1" and [m["role"] for m in conv.messages] == ["system", "user", "assistant"]
    assert to_sharegpt(conv)["conversations"] == obj["conversations"]
    with pytest.raises(RecordError, match="unknown speaker 'alien'"):
        from_sharegpt({"conversations": [{"from": "alien", "value": "x"}]})
    with pytest.raises(RecordError, match="alternate"):
        from_sharegpt({"conversations": [{"from": "gpt", "value": "x"}]})


def test_openai_content_parts():
    conv = from_openai({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]})
    assert conv.messages[0]["content"] == "hi there"
    assert to_openai(conv) == {"messages": conv.messages}


def test_iter_source_reports_line(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "a"}) + "\n")
    with pytest.raises(RecordError, match=rf"{path}:2: missing field `output`"):
        list(iter_source(path, "alpaca"))


def test_iter_source_json_list_and_parquet(tmp_path):
    rows = [{"instruction": f"task {i}", "input": "", "output": f"answer {i}"} for i in range(3)]
    jpath = tmp_path / "alpaca.json"
    jpath.write_text(json.dumps(rows))
    assert [r.messages[1]["content"] for r in iter_source(jpath)] == ["answer 0", "answer 1", "answer 2"]
    import datasets

    ppath = tmp_path / "alpaca.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(ppath))
    recs = list(iter_source(ppath))
    assert len(recs) == 3 and recs[0].source == "alpaca"


def test_cli_convert(tmp_path):
    src = tmp_path / "sg.jsonl"
    src.write_text(json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}) + "\n")
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "protege.cli", "data", "convert", "--from", "sharegpt", str(src), str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (rec,) = list(read_records(out))
    assert rec.source == "sg" and rec.messages[1]["content"] == "a"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    proc = subprocess.run([sys.executable, "-m", "protege.cli", "data", "convert", str(bad), str(tmp_path / "o2.jsonl")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and f"{bad}:1: bad JSON" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o2.jsonl").exists()


def test_cli_stats(tmp_path, tiny_llama_dir):
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "two plus three"}, {"role": "assistant", "content": "five"}]}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "protege.cli", "data", "stats", str(src), "--model", str(tiny_llama_dir), "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["records"] == 1 and stats["per_role"]["user"]["chars"] == len("two plus three")
    assert stats["per_role"]["assistant"]["tokens"] >= 1


def test_sample_stage_is_nested_and_deterministic(tmp_path):
    from protege.data_tools import SampleConfig, run_sample
    from protege.records import write_records

    src = tmp_path / "pool.jsonl"
    write_records(src, [Conversation([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}])
                        for i in range(30)])
    run_sample(SampleConfig(src=str(src), n=10, out_dir=str(tmp_path / "s10")))
    counts = run_sample(SampleConfig(src=str(src), n=20, out_dir=str(tmp_path / "s20")))
    small = [r.id for r in read_records(tmp_path / "s10" / "records.jsonl")]
    large = [r.id for r in read_records(tmp_path / "s20" / "records.jsonl")]
    assert counts == {"in": 30, "kept": 20} and large[:10] == small and len(set(large)) == 20


def test_sample_stage_writes_the_rest_as_a_disjoint_held_out_split(tmp_path):
    from protege.data_tools import SampleConfig, run_sample
    from protege.records import write_records

    src = tmp_path / "pool.jsonl"
    pool = [Conversation([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}])
            for i in range(30)]
    write_records(src, pool)
    counts = run_sample(SampleConfig(src=str(src), n=8, out_dir=str(tmp_path / "s"), write_rest=True))
    held = [r.id for r in read_records(tmp_path / "s" / "records.jsonl")]
    rest = [r.id for r in read_records(tmp_path / "s" / "rest.jsonl")]
    assert counts == {"in": 30, "kept": 8, "rest": 22}
    assert not set(held) & set(rest) and sorted(held + rest) == sorted(r.id for r in pool)
    assert rest == [r.id for r in pool if r.id not in set(held)]  # file order kept
    run_sample(SampleConfig(src=str(src), n=8, out_dir=str(tmp_path / "plain")))
    assert not (tmp_path / "plain" / "rest.jsonl").exists()  # only on request


def test_trl_prompt_only_and_prompt_completion_records():
    from protege.formats import convert_obj, detect_format

    assert detect_format({"prompt": "hi"}) == "prompt"
    rec = convert_obj({"id": "q1", "prompt": "What is 2+2?", "gold": "4"})
    assert rec.messages == [{"role": "user", "content": "What is 2+2?"}] and rec.meta == {"gold": "4"}
    rec = convert_obj({"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                       "completion": [{"role": "assistant", "content": "hello"}]})
    assert [m["role"] for m in rec.messages] == ["system", "user", "assistant"]
    assert detect_format({"prompt": "p", "chosen": "a", "rejected": "b"}) != "prompt"  # still a preference pair
    with pytest.raises(Exception, match="expected text or a list of messages"):
        convert_obj({"prompt": 3})


def test_convert_reports_repeated_ids(tmp_path):
    """Issue 31 (LOW): `data convert` passed repeated ids without a word."""
    from protege.data_tools import convert

    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({**rec, "id": i}) + "\n" for i in ("a", "b", "a", "a")))
    repeated: list[str] = []
    assert convert(src, tmp_path / "out.jsonl", repeated=repeated) == 4
    assert repeated == ["a", "a"]


def test_convert_stage_writes_validated_records_and_names_the_bad_line(tmp_path):
    """`data.convert`: a user's ShareGPT file in, protege records out; a bad line is file:line and leaves nothing."""
    from protege.data_tools import ConvertConfig, run_convert
    from protege.errors import UserError

    src = tmp_path / "sharegpt.json"
    convs = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
             for i in range(3)]
    src.write_text(json.dumps(convs))
    counts = run_convert(ConvertConfig(src=str(src), out_dir=str(tmp_path / "out")))
    recs = list(read_records(tmp_path / "out" / "records.jsonl"))
    assert counts["records"] == 3 and [r.messages[1]["content"] for r in recs] == ["a0", "a1", "a2"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["records"] == 3
    assert {r.source for r in recs} == {"sharegpt"}  # the file's name when the records carry none
    run_convert(ConvertConfig(src=str(src), source="distill", out_dir=str(tmp_path / "named")))
    assert {r.source for r in read_records(tmp_path / "named" / "records.jsonl")} == {"distill"}
    run_convert(ConvertConfig(src=str(tmp_path / "out" / "records.jsonl"), to_format="sharegpt",
                              out_dir=str(tmp_path / "back")))
    assert json.loads((tmp_path / "back" / "records.jsonl").read_text().splitlines()[0])["conversations"] == \
        convs[0]["conversations"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(convs[0]) + "\n" + json.dumps({"conversations": [{"from": "gpt"}]}) + "\n")
    with pytest.raises(UserError, match="bad.jsonl:2"):
        run_convert(ConvertConfig(src=str(bad), out_dir=str(tmp_path / "bad-out")))
    assert not (tmp_path / "bad-out" / "records.jsonl").exists()


def test_question_files_are_prompt_sets_for_distill_and_eval(tmp_path):
    """FastChat's question.jsonl (`turns`) is read by one reader: every turn a user message, category kept."""
    from protege.formats import is_question_file, read_questions
    from protege.generate.distill import load_prompts

    q = tmp_path / "question.jsonl"
    q.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]}) + "\n")
    assert is_question_file(q) and not is_question_file(tmp_path / "missing.jsonl")
    assert read_questions(q)[0]["turns"] == ["Write a poem.", "Shorter."]
    [(pid, source, msgs, meta)] = load_prompts(str(q), "auto")
    assert pid == "81" and meta == {"category": "writing"}
    assert msgs == [{"role": "user", "content": "Write a poem."}, {"role": "user", "content": "Shorter."}]
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert not is_question_file(records)
