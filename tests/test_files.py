"""The one I/O kit: strict JSONL with file:line errors for hostile input, tolerant logs, atomic writes."""

from __future__ import annotations

import json

import pytest

from protege.errors import RecordError
from protege.files import atomic_path, atomic_write_json, json_lines, jsonl_rows, read_jsonl, tolerant_jsonl


@pytest.mark.parametrize("line, problem", [
    ('{"a": NaN}', "NaN is not a JSON number"),
    ('{"a": -Infinity}', "-Infinity is not a JSON number"),
    ('{"a": ' + "9" * 5000 + "}", "bad JSON"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"a": "\\ud800"}', "lone UTF-16 surrogate"),
    ('{"a": 1', "bad JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
])
def test_a_hostile_line_is_an_error_at_its_file_and_line(tmp_path, line, problem):
    path = tmp_path / "in.jsonl"
    path.write_text('{"ok": 1}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(RecordError) as err:
        read_jsonl(path)
    assert str(err.value).startswith(f"{path}:3: ") and problem in str(err.value)


def test_bom_invalid_utf8_and_paired_surrogates(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes("\ufeff".encode() + b'{"a": "\\ud83d\\ude00"}\n{"b": 2}\n')
    assert read_jsonl(path) == [{"a": "\U0001F600"}, {"b": 2}]  # BOM skipped; a surrogate *pair* is one character
    path.write_bytes(b'{"a": 1}\n{"b": "\xff"}\n')
    with pytest.raises(RecordError, match=r"in.jsonl:2: invalid UTF-8 at byte"):
        read_jsonl(path)


def test_keep_going_reports_every_bad_line_and_json_arrays_read_as_items(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"a": 1}\nnope\n{"b": NaN}\n{"c": 3}\n')
    rows = list(json_lines(path, keep_going=True))
    assert [n for n, _ in rows] == [1, 2, 3, 4]
    assert [type(v).__name__ for _, v in rows] == ["dict", "RecordError", "RecordError", "dict"]
    arr = tmp_path / "in.json"
    arr.write_text('\n  [{"a": 1},\n {"b": 2}]\n')
    assert list(json_lines(arr, json_array=True)) == [(1, {"a": 1}), (2, {"b": 2})]
    assert list(jsonl_rows("inline.jsonl", text='{"x": 1}\n')) == [(1, {"x": 1})]


def test_tolerant_reader_skips_a_cut_last_line_and_a_missing_file(tmp_path):
    log = tmp_path / "cache.jsonl"
    assert list(tolerant_jsonl(log)) == []
    log.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "val')
    assert [r["id"] for r in tolerant_jsonl(log)] == [1, 2]


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic_write_json(path, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]
    atomic_write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 2}


def test_yaml_alias_bombs_and_self_references_are_refused(tmp_path):
    from protege.config import ConfigError, read_yaml

    bomb = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):  # 10^8 values once expanded, from 8 short lines
        bomb.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 10) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(bomb) + "\n")
    with pytest.raises(ConfigError, match=r"bomb.yaml: YAML aliases expand to more than"):
        read_yaml(path)
    path.write_text("a: &loop [1, *loop]\n")
    with pytest.raises(ConfigError, match="alias that refers to itself"):
        read_yaml(path)
    path.write_text("base: &b {lr: 0.1}\nrun: {<<: *b, epochs: 2}\n")  # ordinary aliases still work
    assert read_yaml(path) == {"base": {"lr": 0.1}, "run": {"lr": 0.1, "epochs": 2}}


def test_a_pipe_is_refused_instead_of_blocking(tmp_path):
    import os

    from protege.records import read_records

    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(RecordError, match="not a regular file"):
        read_jsonl(fifo)
    with pytest.raises(RecordError, match="not a regular file"):
        list(read_records(fifo))


def test_data_validate_reports_every_hostile_line_without_a_traceback(tmp_path):
    import subprocess
    import sys

    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    lines = [good, '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}',
             '{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}',
             '{"messages": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000]
    path = tmp_path / "fuzz.jsonl"
    path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "protege.cli", "data", "validate", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout
    assert [int(line.split(":")[1]) for line in proc.stdout.splitlines()] == [2, 3, 4, 5]
    assert "1 valid records" in proc.stderr


def test_atomic_dir_replaces_a_folder_only_when_complete(tmp_path):
    from protege.files import atomic_dir

    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as work:
        (work / "half.txt").write_text("half")
        raise RuntimeError("killed mid-save")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (target / "old.txt").is_file()
    with atomic_dir(target) as work:
        (work / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
