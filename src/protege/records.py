"""Conversation and Comparison records, validated streaming JSONL I/O.

Record shapes:

    Conversation: {"id", "messages": [{"role", "content"}], "source", "meta"}
    Comparison:   {"id", "prompt": [messages], "chosen": {"role": "assistant", "content"},
                   "rejected": {...}, "margin": float | null, "source", "meta"}

A record keeps the `id` it came with; one without gets a stable content hash, so
dedup, decontamination and provenance can refer to it across stages.
Every line is validated on read. A bad line is either an error naming
`file:line` and the problem, or (``skip_invalid=True``) goes to a rejected file
with its reason; nothing is dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

from .errors import RecordError
from .files import atomic_path, json_digest, parse_jsonl_line

__all__ = [
    "SkipRecord",
    "ROLE_ALIASES",
    "MissingSource",
    "Conversation",
    "Comparison",
    "Record",
    "RecordError",
    "ROLES",
    "content_id",
    "parse_record",
    "read_records",
    "RecordReader",
    "write_records",
    "JsonlWriter",
    "check_file",
    "record_id",
]

ROLES = ("system", "user", "assistant")
# Every speaker name the supported formats use (ShareGPT `from`, OpenAssistant, scraped exports), lower-cased.
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "prompter": "user",
                "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
                "bing": "assistant", "bot": "assistant", "model": "assistant"}


class MissingSource(RecordError, FileNotFoundError):
    """A record source that does not exist (a RecordError for the CLI, a FileNotFoundError for callers)."""


class SkipRecord(RecordError):
    """A well-formed record that cannot be used (e.g. a preference pair whose answers are equal).

    Readers that are given a counter count these by `problem` and go on; strict readers raise.
    """


def content_id(payload: Any) -> str:
    """Stable 16-hex-digit id from the canonical JSON of a record's content."""
    return json_digest(payload, 16)


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    id: str = ""
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.id:
            self.id = content_id(self.messages)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "messages": self.messages, "source": self.source, "meta": self.meta}

    @property
    def system(self) -> str | None:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None

    def first_user(self) -> str:
        return next((m["content"] for m in self.messages if m["role"] == "user"), "")


@dataclass
class Comparison:
    prompt: list[dict[str, str]]
    chosen: dict[str, str]
    rejected: dict[str, str]
    margin: float | None = None
    id: str = ""
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.id:
            self.id = content_id([self.prompt, self.chosen, self.rejected])

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "margin": self.margin,
            "source": self.source,
            "meta": self.meta,
        }


Record = Union[Conversation, Comparison]


def _check_message(msg: Any, where: str) -> dict[str, str]:
    if not isinstance(msg, dict):
        raise RecordError(f"{where}: expected an object with `role` and `content`, got {type(msg).__name__}")
    if "role" not in msg:
        raise RecordError(f"{where}: missing field `role`")
    if "content" not in msg:
        raise RecordError(f"{where}: missing field `content`")
    role, content = msg["role"], msg["content"]
    if role not in ROLES:
        raise RecordError(f"{where}.role: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if not isinstance(content, str):
        raise RecordError(f"{where}.content: expected a string, got {type(content).__name__}")
    if not content.strip():
        raise RecordError(f"{where}.content: empty content")
    return {"role": role, "content": content}


def check_messages(messages: Any, field_name: str = "messages", require_assistant_last: bool = False) -> list[dict[str, str]]:
    """Validate a message list: roles known, content non-empty, system only first, user/assistant alternate."""
    if not isinstance(messages, list):
        raise RecordError(f"`{field_name}`: expected a list of messages, got {type(messages).__name__}")
    if not messages:
        raise RecordError(f"`{field_name}`: no messages")
    out = [_check_message(m, f"`{field_name}[{i}]`") for i, m in enumerate(messages)]
    start = 1 if out[0]["role"] == "system" else 0
    expected = "user"
    for i in range(start, len(out)):
        role = out[i]["role"]
        if role == "system":
            raise RecordError(f"`{field_name}[{i}]`: system message must come first")
        if role != expected:
            raise RecordError(f"`{field_name}[{i}]`: roles must alternate user/assistant, expected {expected!r}, got {role!r}")
        expected = "assistant" if role == "user" else "user"
    if start == len(out):
        raise RecordError(f"`{field_name}`: only a system message, no user turn")
    if require_assistant_last and out[-1]["role"] != "assistant":
        raise RecordError(f"`{field_name}`: last message must be from the assistant for training")
    return out


def record_id(obj: dict[str, Any]) -> str:
    """The record's `id` as a string ("" if absent or null); a bool, float, list or object is an error."""
    rid = obj.get("id", "")
    if rid is None:
        return ""
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):  # bool is an int to Python; `true` is no id
        raise RecordError(f"`id`: expected a string or an integer, got {json.dumps(rid, default=str)[:40]}")
    return str(rid)


def _check_meta(obj: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    rid = record_id(obj)
    source = obj.get("source", "") or ""
    if not isinstance(source, str):
        raise RecordError(f"`source`: expected a string, got {type(source).__name__}")
    meta = obj.get("meta", {}) or {}
    if not isinstance(meta, dict):
        raise RecordError(f"`meta`: expected an object, got {type(meta).__name__}")
    return rid, source, meta


def parse_record(obj: Any, kind: str = "auto") -> Record:
    """Turn a decoded JSON object into a validated Conversation or Comparison.

    `kind` is "conversation", "comparison" or "auto" (decided by the fields present).
    """
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
    if kind == "auto":
        kind = "comparison" if "chosen" in obj or "rejected" in obj else "conversation"
    rid, source, meta = _check_meta(obj)
    if kind == "conversation":
        if "messages" not in obj:
            raise RecordError("missing field `messages`")
        return Conversation(messages=check_messages(obj["messages"]), id=rid, source=source, meta=meta)
    if kind == "comparison":
        for name in ("prompt", "chosen", "rejected"):
            if name not in obj:
                raise RecordError(f"missing field `{name}`")
        prompt = check_messages(obj["prompt"], "prompt")
        if prompt[-1]["role"] != "user":
            raise RecordError("`prompt`: last message must be from the user")
        chosen = _check_message(obj["chosen"], "`chosen`")
        rejected = _check_message(obj["rejected"], "`rejected`")
        for name, msg in (("chosen", chosen), ("rejected", rejected)):
            if msg["role"] != "assistant":
                raise RecordError(f"`{name}.role`: expected 'assistant', got {msg['role']!r}")
        margin = obj.get("margin")
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
            raise RecordError(f"`margin`: expected a number or null, got {margin!r}")
        if chosen["content"].strip() == rejected["content"].strip():
            raise SkipRecord("chosen == rejected")
        return Comparison(prompt, chosen, rejected, None if margin is None else float(margin), rid, source, meta)
    raise ValueError(f"unknown record kind {kind!r}")


def check_file(path: str | Path) -> Path:
    """`path` as a Path if it is a readable file; otherwise a "no such file" / "is a folder" error."""
    p = Path(path)
    if not p.exists():
        raise MissingSource(f"{p}: no such file")
    if p.is_dir():
        raise RecordError(f"{p}: is a folder, expected a record file (.jsonl)")
    if not p.is_file():  # a FIFO or device would block the reader or never end
        raise RecordError(f"{p}: not a regular file (a pipe or device?); expected a record file (.jsonl)")
    return p


def _iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            yield lineno, raw


def _decode_line(raw: bytes, kind: str) -> Record | None:
    """Parse one JSONL line; None for a blank line; RecordError (without location) otherwise."""
    obj = parse_jsonl_line(raw)
    return None if obj is None else parse_record(obj, kind)


class RecordReader:
    """Iterate validated records of a JSONL file.

    With ``skip_invalid=False`` the first bad line raises ``RecordError("file:line: ...")``.
    With ``skip_invalid=True`` bad lines go to ``rejected_path`` (if given) as
    ``{"file", "line", "reason", "raw"}`` and are counted in ``self.rejected``.
    """

    def __init__(
        self,
        path: str | Path,
        kind: str = "auto",
        skip_invalid: bool = False,
        rejected_path: str | Path | None = None,
    ):
        self.path = check_file(path)
        self.kind = kind
        self.skip_invalid = skip_invalid
        self.rejected_path = Path(rejected_path) if rejected_path else None
        self.read = 0
        self.rejected = 0

    def __iter__(self) -> Iterator[Record]:
        rejected_fh = None
        try:
            for lineno, raw in _iter_lines(self.path):
                try:
                    rec = _decode_line(raw, self.kind)
                except RecordError as err:
                    if not self.skip_invalid:
                        raise RecordError(err.problem, str(self.path), lineno) from None
                    self.rejected += 1
                    if self.rejected_path is not None:
                        if rejected_fh is None:
                            self.rejected_path.parent.mkdir(parents=True, exist_ok=True)
                            rejected_fh = self.rejected_path.open("a", encoding="utf-8")
                        entry = {"file": str(self.path), "line": lineno, "reason": err.problem,
                                 "raw": raw.decode("utf-8", errors="replace").rstrip("\n")}
                        rejected_fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
                    continue
                if rec is not None:
                    self.read += 1
                    yield rec
        finally:
            if rejected_fh is not None:
                rejected_fh.close()


def read_records(path: str | Path, kind: str = "auto", skip_invalid: bool = False,
                 rejected_path: str | Path | None = None) -> Iterator[Record]:
    """Stream validated records from a JSONL file (see `RecordReader`)."""
    return iter(RecordReader(path, kind, skip_invalid, rejected_path))


class JsonlWriter:
    """Append-safe JSONL writer: one record per line, flushed per write so a killed run keeps whole lines.

    `flush=False` buffers instead, for files whose completeness another marker vouches for (curate's step
    folders are finished only once their state.json is written): a million flushes cost seconds."""

    def __init__(self, path: str | Path, append: bool = False, flush: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a" if append else "w", encoding="utf-8")
        self._flush = flush
        self.written = 0

    def write(self, record: Record | dict[str, Any]) -> None:
        self.write_all([record])

    def write_all(self, records: Iterable[Record | dict[str, Any]]) -> None:
        lines = [json.dumps(r.to_dict() if hasattr(r, "to_dict") else r, ensure_ascii=False) + "\n" for r in records]
        self._fh.writelines(lines)
        if self._flush:
            self._fh.flush()
        self.written += len(lines)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_records(path: str | Path, records: Iterable[Record | dict[str, Any]]) -> int:
    """Write records to a JSONL file (atomically: a temp file renamed at the end); return the count."""
    with atomic_path(path) as tmp, JsonlWriter(tmp) as w:
        for rec in records:
            w.write(rec)
    return w.written
