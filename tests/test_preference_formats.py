"""Preference importers: every format -> Comparison, skips counted by reason, bad input -> file:line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import SHARED_DATA
from protege.data_tools import convert, stats
from protege.formats import iter_source, validate_source
from protege.records import Comparison, RecordError, read_records

HH = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant: Why did the chicken cross the road?",
      "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant: No."}


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one(tmp_path, obj, fmt="auto"):
    recs = list(iter_source(write(tmp_path / "x.jsonl", [obj]), fmt))
    assert len(recs) == 1 and isinstance(recs[0], Comparison)
    return recs[0]


def test_hh_transcripts_split_into_shared_prompt_and_last_answer(tmp_path):
    rec = one(tmp_path, HH)
    assert [m["role"] for m in rec.prompt] == ["user", "assistant", "user"]
    assert rec.prompt[-1]["content"] == "Tell me a joke"
    assert rec.chosen == {"role": "assistant", "content": "Why did the chicken cross the road?"}
    assert rec.rejected["content"] == "No." and rec.source == "x"


def test_trl_string_message_and_implicit_prompt_forms(tmp_path):
    a = one(tmp_path, {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"})
    assert a.prompt == [{"role": "user", "content": "What is 2+2?"}] and a.chosen["content"] == "4"
    b = one(tmp_path, {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
                       "rejected": [{"role": "assistant", "content": "Go away"}], "margin": 2})
    assert b.margin == 2.0 and b.rejected["content"] == "Go away"
    convo = [{"role": "user", "content": "Hi"}]
    c = one(tmp_path, {"chosen": convo + [{"role": "assistant", "content": "Hello"}],
                       "rejected": convo + [{"role": "assistant", "content": "Meh"}]})
    assert c.prompt == convo and c.chosen["content"] == "Hello"
    # an HH-style prompt string, as in TRL's hh-rlhf-helpful-base conversions
    d = one(tmp_path, {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello", "rejected": " Bye"})
    assert d.prompt == [{"role": "user", "content": "Hi"}]


def test_sharegpt_ultrafeedback_webgpt_summarize(tmp_path):
    s = one(tmp_path, {"conversations": [{"from": "human", "value": "Q?"}], "chosen": {"from": "gpt", "value": "good"},
                       "rejected": {"from": "gpt", "value": "bad"}, "system": "Be brief."})
    assert [m["role"] for m in s.prompt] == ["system", "user"] and s.chosen["content"] == "good"
    u = one(tmp_path, {"instruction": "Write a haiku", "completions": [
        {"response": "mid", "overall_score": 6.0}, {"response": "best", "overall_score": 9.0},
        {"response": "worst", "overall_score": 2.5}]})
    assert (u.chosen["content"], u.rejected["content"], u.margin) == ("best", "worst", 6.5)
    w = one(tmp_path, {"question": {"full_text": "Why is the sky blue?"}, "answer_0": "Rayleigh scattering.",
                       "answer_1": "Because.", "score_0": -0.5, "score_1": 0.5})
    assert w.chosen["content"] == "Because." and w.margin == 1.0
    z = one(tmp_path, {"info": {"post": "Long post", "title": "T"}, "summaries": [{"text": "s0"}, {"text": "s1"}], "choice": 1})
    assert z.chosen["content"] == "s1" and "Long post" in z.prompt[0]["content"]


def test_unusable_pairs_are_counted_not_dropped_silently(tmp_path):
    rows = [HH, {"prompt": "q", "chosen": "same", "rejected": "same"},
            {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
            {"question": "q", "answer_0": "a", "answer_1": "b", "score_0": 0, "score_1": 0}]
    path = write(tmp_path / "p.jsonl", rows)
    with pytest.raises(RecordError, match=r"p.jsonl:2: chosen == rejected"):
        list(iter_source(path))
    skipped: dict[str, int] = {}
    out = tmp_path / "out.jsonl"
    assert convert(path, out, skipped=skipped) == 1
    assert skipped == {"chosen == rejected": 1, "prompts differ": 1, "tie": 1}
    good, errors, skips = validate_source(path)
    assert good == 1 and not errors and [e.line for e in skips] == [2, 3, 4]
    assert stats(path)["skipped"] == skipped


def test_bad_preference_records_name_file_line_and_field(tmp_path):
    path = write(tmp_path / "bad.jsonl", [HH, {"prompt": "q", "chosen": 3, "rejected": "r"},
                                          {"instruction": "x", "completions": [{"response": "a"}, {"response": "b"}]}])
    _, errors, _ = validate_source(path)
    assert [(e.line, e.problem.split(":")[0]) for e in errors] == [(2, "`chosen`"), (3, "`completions[0]`")]
    with pytest.raises(RecordError, match=r"bad.jsonl:2: `chosen`"):
        list(iter_source(path))
    out = tmp_path / "out.jsonl"
    with pytest.raises(RecordError):
        convert(path, out)
    assert not out.exists()  # nothing half-written


def test_convert_round_trip_to_trl_and_refuses_conversation_formats(tmp_path):
    path = write(tmp_path / "p.jsonl", [HH])
    convert(path, tmp_path / "trl.jsonl", to_format="trl")
    back = list(iter_source(tmp_path / "trl.jsonl"))
    assert back[0].chosen == one(tmp_path, HH).chosen and back[0].prompt == one(tmp_path, HH).prompt
    with pytest.raises(RecordError, match="preference pair"):
        convert(path, tmp_path / "a.jsonl", to_format="alpaca")


def test_real_hh_and_llamafactory_files(tmp_path):
    hh = SHARED_DATA / "hh_rlhf" / "harmless_base_dev.jsonl"
    lf = SHARED_DATA / "preference_formats" / "llamafactory_dpo_en_demo.json"
    if not hh.exists() or not lf.exists():
        pytest.skip("real preference files not present beside the project")
    skipped: dict[str, int] = {}
    n = convert(hh, tmp_path / "hh.jsonl", skipped=skipped)
    assert n + sum(skipped.values()) == 1812 and n >= 1800
    recs = list(read_records(tmp_path / "hh.jsonl"))  # protege's own reader accepts what convert wrote
    assert all(r.prompt[-1]["role"] == "user" and r.chosen["content"] != r.rejected["content"] for r in recs)
    assert convert(lf, tmp_path / "lf.jsonl") == 300
    proc = subprocess.run([sys.executable, "-m", "protege.cli", "data", "stats", str(tmp_path / "hh.jsonl")],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "chosen longer than rejected" in proc.stdout


def test_a_mistyped_path_is_no_such_file_never_a_hub_request(tmp_path, monkeypatch):
    import datasets

    def no_network(*a, **k):
        raise AssertionError("reached datasets.load_dataset")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    with pytest.raises(RecordError, match="no such file"):
        list(iter_source(tmp_path / "typo.jsonl"))
    proc = subprocess.run([sys.executable, "-m", "protege.cli", "data", "convert", str(tmp_path / "typo.jsonl"),
                           str(tmp_path / "out.jsonl")], capture_output=True, text=True)
    assert proc.returncode != 0 and "no such file" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.jsonl").exists()
