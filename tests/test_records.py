from __future__ import annotations

import json
import subprocess
import sys

import pytest

from protege.records import (Comparison, Conversation, JsonlWriter, RecordError, RecordReader, content_id,
                             parse_record, read_records, write_records)
from protege.formats import validate_source

GOOD = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello!"}]}


def test_parse_and_stable_id():
    rec = parse_record(GOOD)
    assert isinstance(rec, Conversation) and len(rec.id) == 16
    assert parse_record(json.loads(json.dumps(GOOD))).id == rec.id  # content hash is stable
    assert parse_record({**GOOD, "id": "keep-me"}).id == "keep-me"  # an incoming id is kept
    other = parse_record({"messages": [{"role": "user", "content": "Hi!"}]})
    assert other.id != rec.id


@pytest.mark.parametrize("obj, problem", [
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "  "}]}, "empty content"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "system message must come first"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "roles must alternate"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "expected 'user', got 'assistant'"),
    ({"msgs": []}, "missing field `messages`"),
    ({"messages": [{"role": "user"}]}, "missing field `content`"),
    ({"messages": []}, "no messages"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": {"role": "assistant", "content": "a"}}, "missing field `rejected`"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": {"role": "assistant", "content": "a"},
      "rejected": {"role": "assistant", "content": "b"}, "margin": "big"}, "`margin`"),
])
def test_bad_records(obj, problem):
    with pytest.raises(RecordError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse_record(obj)


def test_comparison_round_trip(tmp_path):
    cmp = Comparison([{"role": "user", "content": "q"}], {"role": "assistant", "content": "good"},
                     {"role": "assistant", "content": "bad"}, margin=1.5)
    path = tmp_path / "c.jsonl"
    write_records(path, [cmp])
    (back,) = list(read_records(path))
    assert back == cmp


def _planted_file(tmp_path):
    bad = {
        2: "{not json",
        4: json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),
        6: json.dumps({"messages": [{"role": "user", "content": ""}]}),
        7: json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
    }
    out = []
    for i in range(1, 10):
        out.append(bad.get(i, json.dumps(GOOD)).encode())
    out[8] = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'  # line 9: latin-1 byte, invalid UTF-8
    path = tmp_path / "planted.jsonl"
    path.write_bytes(b"\n".join(out) + b"\n")
    return path, [2, 4, 6, 7, 9]


def test_validate_reports_every_bad_line(tmp_path):
    path, bad_lines = _planted_file(tmp_path)
    good, errors, _ = validate_source(path)
    assert good == 4
    assert [e.line for e in errors] == bad_lines
    assert all(str(e).startswith(f"{path}:") for e in errors)
    assert "invalid UTF-8" in str(errors[-1]) and "bad JSON" in str(errors[0])


def test_cli_validate_exit_codes(tmp_path):
    path, bad_lines = _planted_file(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "protege.cli", "data", "validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 1
    reported = [int(line.split(":")[1]) for line in proc.stdout.splitlines()]
    assert reported == bad_lines
    clean = tmp_path / "clean.jsonl"
    write_records(clean, [parse_record(GOOD), parse_record({**GOOD, "id": "second"})])
    proc = subprocess.run([sys.executable, "-m", "protege.cli", "data", "validate", str(clean)], capture_output=True, text=True)
    assert proc.returncode == 0 and "2 valid records" in proc.stderr


def test_reader_stops_or_quarantines(tmp_path):
    path, bad_lines = _planted_file(tmp_path)
    with pytest.raises(RecordError, match=rf"{path}:2: bad JSON"):
        list(read_records(path))
    rejected = tmp_path / "rejected.jsonl"
    reader = RecordReader(path, skip_invalid=True, rejected_path=rejected)
    assert len(list(reader)) == 4 and reader.rejected == 5
    entries = [json.loads(line) for line in rejected.read_text().splitlines()]
    assert [e["line"] for e in entries] == bad_lines and all(e["reason"] for e in entries)


def test_writer_appends_whole_lines(tmp_path):
    path = tmp_path / "out.jsonl"
    with JsonlWriter(path) as w:
        w.write(parse_record(GOOD))
    with JsonlWriter(path, append=True) as w:
        w.write({"messages": [{"role": "user", "content": "next"}]})
    assert len(list(read_records(path))) == 2
    assert content_id([1, 2]) == content_id([1, 2])
