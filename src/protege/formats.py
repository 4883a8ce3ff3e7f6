"""Converters between protege records and the formats the community uses.

- Alpaca:   {"instruction", "input", "output"}
- ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system", "value"}]}
- OpenAI:   {"messages": [{"role", "content"}]}
- TRL prompt-only: {"prompt": "text"} or {"prompt": [{"role", "content"}, ...]} (optional `completion`)
- preference sets (Anthropic HH, TRL, ShareGPT/LLaMA-Factory, UltraFeedback, WebGPT, summarize-from-feedback):
  see `preference_formats`
- anything `datasets` can load (parquet, csv, arrow, a saved dataset folder), and a hub dataset only when
  asked for explicitly as `hf:org/name` (a mistyped local path is a "no such file" error, never a download)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from .files import json_lines, jsonl_rows
from .preference_formats import PREFERENCE_FORMATS, convert_preference, detect_preference_format
from .records import (ROLE_ALIASES, Comparison, Conversation, MissingSource, Record, RecordError, SkipRecord,
                      check_file, check_messages, parse_record, record_id)

__all__ = [
    "is_question_file",
    "read_questions",
    "FORMATS",
    "from_alpaca",
    "to_alpaca",
    "from_sharegpt",
    "to_sharegpt",
    "from_openai",
    "from_prompt",
    "to_openai",
    "detect_format",
    "convert_obj",
    "iter_source",
    "validate_source",
    "to_trl",
]

FORMATS = ("alpaca", "sharegpt", "openai", "protege", "prompt", *PREFERENCE_FORMATS)

_TO_SHAREGPT = {"user": "human", "assistant": "gpt", "system": "system"}


def from_alpaca(obj: dict[str, Any], source: str = "alpaca") -> Conversation:
    """`instruction` (+ optional `input`, appended after a blank line) -> user; `output` -> assistant."""
    for key in ("instruction", "output"):
        if key not in obj:
            raise RecordError(f"missing field `{key}` (Alpaca records need instruction and output)")
    instruction, extra = obj["instruction"], obj.get("input") or ""
    if not isinstance(instruction, str) or not isinstance(extra, str) or not isinstance(obj["output"], str):
        raise RecordError("`instruction`, `input` and `output` must be strings")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]
    if obj.get("system"):
        messages.insert(0, {"role": "system", "content": obj["system"]})
    return Conversation(check_messages(messages), id=record_id(obj), source=source,
                        meta={k: v for k, v in obj.items() if k not in ("instruction", "input", "output", "id", "system")})


def to_alpaca(conv: Conversation) -> dict[str, Any]:
    """Single-turn conversations only: Alpaca has no place for a second turn."""
    turns = [m for m in conv.messages if m["role"] != "system"]
    if len(turns) != 2:
        raise RecordError(f"record {conv.id}: Alpaca holds one user/assistant pair, this has {len(turns)} messages")
    out = {"id": conv.id, "instruction": turns[0]["content"], "input": "", "output": turns[1]["content"]}
    if conv.system:
        out["system"] = conv.system
    return out


def from_sharegpt(obj: dict[str, Any], source: str = "sharegpt") -> Conversation:
    turns = obj.get("conversations", obj.get("conversation"))
    if turns is None:
        raise RecordError("missing field `conversations`")
    if not isinstance(turns, list):
        raise RecordError("`conversations`: expected a list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RecordError(f"`conversations[{i}]`: expected an object with `from` and `value`")
        role = ROLE_ALIASES.get(str(turn["from"]).lower())
        if role is None:
            raise RecordError(f"`conversations[{i}].from`: unknown speaker {turn['from']!r} (expected human, gpt or system)")
        messages.append({"role": role, "content": turn["value"]})
    meta = {k: v for k, v in obj.items() if k not in ("conversations", "conversation", "id")}
    return Conversation(check_messages(messages, "conversations"), id=record_id(obj), source=source, meta=meta)


def to_sharegpt(conv: Conversation) -> dict[str, Any]:
    return {"id": conv.id, "conversations": [{"from": _TO_SHAREGPT[m["role"]], "value": m["content"]} for m in conv.messages]}


def from_prompt(obj: dict[str, Any], source: str = "prompt") -> Conversation:
    """TRL's prompt-only / prompt-completion record: `prompt` (text or messages), optional `completion`."""
    prompt = obj.get("prompt")
    if isinstance(prompt, str):
        messages: list[Any] = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        messages = list(prompt)
    else:
        raise RecordError(f"`prompt`: expected text or a list of messages, got {type(prompt).__name__}")
    completion = obj.get("completion")
    if isinstance(completion, str):
        messages.append({"role": "assistant", "content": completion})
    elif isinstance(completion, list):
        messages += completion
    meta = {k: v for k, v in obj.items() if k not in ("prompt", "completion", "id")}
    return Conversation(check_messages(messages), id=record_id(obj), source=source, meta=meta)


def from_openai(obj: dict[str, Any], source: str = "openai") -> Conversation:
    if "messages" not in obj:
        raise RecordError("missing field `messages`")
    if not isinstance(obj["messages"], list):
        raise RecordError(f"`messages`: expected a list of messages, got {type(obj['messages']).__name__}")
    messages = []
    for i, m in enumerate(obj["messages"]):
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            m = {**m, "content": _text_parts(m["content"], f"messages[{i}]")}
        messages.append({"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m)
    meta = {k: v for k, v in obj.items() if k not in ("messages", "id")}
    return Conversation(check_messages(messages), id=record_id(obj), source=source, meta=meta)


def _text_parts(parts: list[Any], where: str) -> str:
    """OpenAI content parts joined into one text; a record with image/audio parts is skipped and counted.

    Dropping an image and keeping the question about it would train the model to answer about a picture
    it never saw, so such records are left out, loudly (convert prints the count, validate warns).
    """
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type", "text") if isinstance(part, dict) else None
        if kind != "text":
            if kind is None:
                raise RecordError(f"`{where}.content[{j}]`: expected a content part object, got {type(part).__name__}")
            raise SkipRecord(f"non-text content part ({kind})")
        if not isinstance(part.get("text"), str):
            raise RecordError(f"`{where}.content[{j}].text`: expected a string")
        texts.append(part["text"])
    return "".join(texts)


def to_openai(conv: Conversation) -> dict[str, Any]:
    return {"messages": conv.messages}


def detect_format(obj: dict[str, Any]) -> str:
    """Guess a record's format from its keys."""
    pref = detect_preference_format(obj)
    if pref is not None:
        return pref
    if "chosen" in obj and "rejected" in obj:
        return "protege"
    if "conversations" in obj or "conversation" in obj:
        return "sharegpt"
    if "instruction" in obj:
        return "alpaca"
    if "messages" in obj:
        return "protege" if ("source" in obj or "meta" in obj) else "openai"
    if "prompt" in obj:
        return "prompt"
    raise RecordError(f"cannot tell the format from keys {sorted(obj)[:8]}; expected messages, conversations, "
                      "instruction/output, prompt (TRL prompt-only), or a preference pair (chosen/rejected, completions, answer_0/answer_1)")


def convert_obj(obj: Any, fmt: str = "auto", source: str = "") -> Record:
    """One decoded object in format `fmt` (or auto-detected) -> a validated record."""
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
    if fmt == "auto":
        fmt = detect_format(obj)
    if fmt == "alpaca":
        return from_alpaca(obj, source or "alpaca")
    if fmt == "sharegpt":
        return from_sharegpt(obj, source or "sharegpt")
    if fmt == "openai":
        return from_openai(obj, source or "openai")
    if fmt == "prompt":
        return from_prompt(obj, source or "prompt")
    if fmt in PREFERENCE_FORMATS:
        return convert_preference(obj, fmt, source)
    if fmt == "protege":
        rec = parse_record(obj)
        if source and not rec.source:
            rec.source = source
        return rec
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _iter_json_objects(path: Path, keep_going: bool = False) -> Iterator[tuple[int, Any]]:
    """(line, object) from JSONL, or from a JSON file holding a list of objects.

    A line that does not decode raises `RecordError(file:line)`, or with `keep_going` is yielded
    as (line, that error) so a validator can report every bad line.
    """
    return json_lines(path, keep_going=keep_going, json_array=True)


def _convert_all(objects: Iterator[tuple[int, Any]], fmt: str, label: str, where: str,
                 skipped: dict[str, int] | None) -> Iterator[Record]:
    """Records from (line, object) pairs; errors get `where:line`; SkipRecords counted into `skipped` (or raised)."""
    for lineno, obj in objects:
        try:
            rec = convert_obj(obj, fmt, label)
        except SkipRecord as err:
            if skipped is None:
                raise RecordError(err.problem, where, lineno) from None
            skipped[err.problem] = skipped.get(err.problem, 0) + 1
            continue
        except RecordError as err:
            raise RecordError(err.problem, where, lineno) from None
        yield rec


def iter_source(src: str | Path, fmt: str = "auto", source: str = "", split: str = "train",
                skipped: dict[str, int] | None = None) -> Iterator[Record]:
    """Records from a JSON/JSONL file in any known format, or anything `datasets.load_dataset` reads.

    Errors carry `file:line` (for JSON files) or the dataset row index. Records that are valid but
    unusable (`SkipRecord`: equal answers, differing prompts, rating ties) are counted by reason
    into `skipped` when it is given, and raise like any bad record when it is not.
    """
    path = Path(src)
    label = source or path.stem
    if not path.exists() and not str(src).startswith("hf:"):
        raise MissingSource(f"{src}: no such file or folder (a hub dataset is read only when named hf:org/name)")
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        yield from _convert_all(_iter_json_objects(path), fmt, label, str(path), skipped)
        return
    import datasets  # heavy import, only when a non-JSON source is used

    if path.is_dir() and (path / "dataset_info.json").exists():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    elif path.is_file():
        builder = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow", ".txt": "text"}.get(path.suffix)
        if builder is None:
            raise RecordError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl, .json, .parquet, .csv, .arrow)")
        ds = datasets.load_dataset(builder, data_files=str(path), split=split)
    elif str(src).startswith("hf:"):
        ds = datasets.load_dataset(str(src)[3:], split=split)
    elif path.is_dir():
        raise RecordError(f"{src}: is a folder but not a saved dataset (no dataset_info.json); give a record file")
    else:
        raise RecordError(f"{src}: no such file or folder (a hub dataset is read only when named hf:org/name)")
    yield from _convert_all(((i + 1, dict(row)) for i, row in enumerate(ds)), fmt, label, str(src), skipped)


def validate_source(src: str | Path, fmt: str = "auto", kind: str = "auto") -> tuple[int, list[RecordError], list[RecordError]]:
    """Check every record of a JSON/JSONL file in any known format, without stopping at the first bad one.

    Returns (usable records, errors with file:line, unusable-but-valid records with file:line:
    preference pairs that readers skip and count, e.g. equal answers). `kind` "conversation"
    or "comparison" also flags records of the other kind.
    """
    path = check_file(src)
    good, errors, skipped = 0, [], []
    want = {"conversation": Conversation, "comparison": Comparison}.get(kind)
    first_line: dict[str, int] = {}  # explicit id -> line it first appeared on
    try:
        for lineno, obj in _iter_json_objects(path, keep_going=True):
            if isinstance(obj, RecordError):
                errors.append(obj)
                continue
            try:
                rec = convert_obj(obj, fmt, path.stem)
            except SkipRecord as err:
                skipped.append(RecordError(f"skipped by readers: {err.problem}", str(path), lineno))
                continue
            except RecordError as err:
                errors.append(RecordError(err.problem, str(path), lineno))
                continue
            if want is not None and not isinstance(rec, want):
                errors.append(RecordError(f"expected a {kind}, got a {type(rec).__name__.lower()}", str(path), lineno))
                continue
            if isinstance(obj, dict) and obj.get("id") not in (None, ""):  # ids given (not content hashes) must be unique
                if rec.id in first_line:
                    errors.append(RecordError(f"duplicate id {rec.id!r}, first used at {path}:{first_line[rec.id]}",
                                              str(path), lineno))
                    continue
                first_line[rec.id] = lineno
            good += 1
    except RecordError as err:  # a JSON-array file that does not decode: nothing in it can be located
        errors.append(err)
    return good, errors, skipped


def to_trl(rec: Record) -> dict[str, Any]:
    """TRL's conversational preference format (`prompt` / `chosen` / `rejected` message lists)."""
    if not isinstance(rec, Comparison):
        raise RecordError(f"record {rec.id}: the trl format holds preference pairs, this is a conversation")
    out: dict[str, Any] = {"id": rec.id, "prompt": rec.prompt, "chosen": [rec.chosen], "rejected": [rec.rejected]}
    if rec.margin is not None:
        out["margin"] = rec.margin
    return out


def _question_turns(row: dict[str, Any], path: Path, line: int) -> list[str]:
    if isinstance(row.get("turns"), list):
        turns = row["turns"]
    elif isinstance(row.get("messages"), list):
        turns = [m.get("content") for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user"]
    elif "prompt" in row:
        turns = [row["prompt"]]
    else:
        raise RecordError("expected `turns` (MT-bench), `messages` or `prompt`", str(path), line)
    if not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise RecordError("every turn must be a non-empty string", str(path), line)
    return turns


def is_question_file(path: str | Path) -> bool:
    """True for a JSONL file whose first record has FastChat's `turns` list (a question file, not records)."""
    p = Path(path)
    if not p.is_file() or p.suffix != ".jsonl":
        return False
    for _, row in jsonl_rows(p):  # rows are objects (a non-object line raises with file:line)
        return isinstance(row.get("turns"), list)
    return False


def read_questions(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """A prompt set -> [{"id", "category", "turns", "reference"}], one row per line of JSONL:

    - FastChat / MT-bench `question.jsonl`: {"question_id", "category", "turns": [str, ...], "reference"?}
    - protege conversations: {"id", "messages"} (the user turns are asked; assistant turns are ignored)
    - simple: {"id"?, "prompt": str, "reference"?}
    """
    path = Path(path)
    if not path.exists():
        raise MissingSource(f"prompt file {path} not found")
    out = []
    for n, row in jsonl_rows(path):
        ref = row.get("reference")
        out.append({"id": str(row.get("question_id", row.get("id", n))), "category": row.get("category", ""),
                    "turns": _question_turns(row, path, n), "reference": [ref] if isinstance(ref, str) else ref})
        if limit is not None and len(out) >= limit:
            break
    return out
