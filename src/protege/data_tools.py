"""`protege data`: convert between formats, validate files, and summarise them."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from .formats import iter_source, to_alpaca, to_openai, to_sharegpt
from .records import Comparison, Conversation, JsonlWriter, read_records

__all__ = ["convert", "stats"]

_WRITERS = {"alpaca": to_alpaca, "sharegpt": to_sharegpt, "openai": to_openai, "protege": lambda r: r.to_dict()}


def convert(src: str | Path, out: str | Path, from_format: str = "auto", to_format: str = "protege") -> int:
    """Convert a file/dataset in `from_format` to `to_format` JSONL; return the record count.

    Written to a temp file and renamed, so a bad line (reported as `file:line`) leaves no half-written output.
    """
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    write = _WRITERS[to_format]
    try:
        with JsonlWriter(tmp) as w:
            for rec in iter_source(src, from_format):
                w.write(write(rec))
            n = w.written
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return n


def stats(path: str | Path, tokenizer: Any = None) -> dict[str, Any]:
    """Counts of records and turns; characters (and tokens, given a tokenizer) per role."""
    out: dict[str, Any] = {"records": 0, "conversations": 0, "comparisons": 0, "turns": 0, "sources": defaultdict(int)}
    chars: dict[str, int] = defaultdict(int)
    tokens: dict[str, int] = defaultdict(int)
    messages: dict[str, int] = defaultdict(int)
    for rec in read_records(path):
        out["records"] += 1
        out["sources"][rec.source or "-"] += 1
        if isinstance(rec, Conversation):
            out["conversations"] += 1
            msgs = rec.messages
            out["turns"] += sum(1 for m in msgs if m["role"] == "user")
        else:
            assert isinstance(rec, Comparison)
            out["comparisons"] += 1
            msgs = rec.prompt + [rec.chosen, {"role": "rejected", "content": rec.rejected["content"]}]
            out["turns"] += 1
        for m in msgs:
            messages[m["role"]] += 1
            chars[m["role"]] += len(m["content"])
            if tokenizer is not None:
                tokens[m["role"]] += len(tokenizer(m["content"], add_special_tokens=False)["input_ids"])
    out["sources"] = dict(out["sources"])
    out["per_role"] = {
        role: {"messages": messages[role], "chars": chars[role], "mean_chars": round(chars[role] / messages[role], 1),
               **({"tokens": tokens[role], "mean_tokens": round(tokens[role] / messages[role], 1)} if tokenizer else {})}
        for role in messages
    }
    return out
