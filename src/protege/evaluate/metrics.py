"""Pure scoring functions for benchmark items: no model, no I/O beyond an in-memory SQLite.

- `mc_metrics`: lm-evaluation-harness multiple-choice metrics from per-option log-likelihoods.
- `extract_answer` / `normalize_answer` / `exact_match`: BBH-style generative scoring.
- `parse_label`: few-shot classification with format adherence (is the answer a valid label at all?).
- `extract_sql` / `sql_match`: text-to-SQL scored by executing predicted and gold queries.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from typing import Any, Sequence

__all__ = ["mc_metrics", "extract_answer", "normalize_answer", "exact_match", "parse_label",
           "extract_sql", "run_sql", "sql_match", "open_sqlite", "SqlResult"]


# ---- multiple choice --------------------------------------------------------------------------

def _argmax(values: Sequence[float]) -> int:
    # First index of the maximum, like numpy.argmax (ties go to the earliest option).
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def mc_metrics(logliks: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, Any]:
    """acc / acc_norm / acc_bytes for one question, exactly as lm-evaluation-harness computes them.

    `logliks[i]` is log P(continuation_i | context); `choices[i]` the option text *without* the
    target delimiter. lm-eval's `acc_norm` divides by the character length of the choice,
    `acc_bytes` by its UTF-8 byte length (the two differ only on non-ASCII text).
    """
    if len(logliks) != len(choices) or not choices:
        raise ValueError(f"need one log-likelihood per choice (got {len(logliks)} for {len(choices)} choices)")
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} outside 0..{len(choices) - 1}")
    chars = [max(len(c), 1) for c in choices]  # max(…,1): an empty option would divide by zero
    nbytes = [max(len(c.encode("utf-8")), 1) for c in choices]
    pred = _argmax(logliks)
    pred_norm = _argmax([ll / n for ll, n in zip(logliks, chars)])
    pred_bytes = _argmax([ll / n for ll, n in zip(logliks, nbytes)])
    return {"pred": pred, "pred_norm": pred_norm, "acc": float(pred == gold),
            "acc_norm": float(pred_norm == gold), "acc_bytes": float(pred_bytes == gold)}


# ---- generative exact match -------------------------------------------------------------------

_NUMBER = re.compile(r"^-?[\d,]*\.?\d+$")


def normalize_answer(text: str) -> str:
    """Canonical form for exact match: trimmed, lower-case, outer quotes/period/parens dropped,
    thousands separators and trailing `.0` removed from numbers ("1,200.0" == "1200")."""
    t = text.strip()
    prev = None
    while t != prev:  # peel quotes, emphasis and a final period in any nesting: '"True".' -> True
        prev = t
        t = t.strip("\"'`* ").rstrip(".")
    if len(t) >= 3 and t[0] == "(" and t[-1] == ")":  # "(A)" -> "a", BBH option letters
        t = t[1:-1]
    t = t.lower()
    if _NUMBER.match(t.replace(" ", "")):
        t = t.replace(",", "").replace(" ", "")
        if "." in t:
            t = t.rstrip("0").rstrip(".")
        if t in ("-0", ""):
            t = "0"
    return t


def extract_answer(text: str, patterns: Sequence[str] = (), which: str = "last") -> str | None:
    """The answer span of a generation: the first pattern (in order) that matches wins; within it the
    `which` ("first" | "last") match; group 1 if the pattern has a group. With no patterns, the first
    non-empty line. None when nothing matches (scored as wrong, and counted as unparsed)."""
    for pat in patterns:
        matches = list(re.finditer(pat, text, flags=re.IGNORECASE | re.MULTILINE))
        if matches:
            m = matches[-1] if which == "last" else matches[0]
            return (m.group(1) if m.groups() else m.group(0)).strip()
    if patterns:
        return None
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return None


def exact_match(predicted: str | None, targets: str | Sequence[str]) -> bool:
    """True when the normalised prediction equals any normalised target."""
    if predicted is None:
        return False
    options = [targets] if isinstance(targets, str) else list(targets)
    pred = normalize_answer(predicted)
    return any(pred == normalize_answer(t) for t in options)


# ---- classification with format adherence -----------------------------------------------------

def parse_label(text: str, labels: Sequence[str]) -> str | None:
    """The label a generation gives, or None if it does not *start* with a valid label.

    Format adherence is strict on purpose (a chat model that ignores the asked-for format has not
    learned the task): leading whitespace, case, quotes and trailing punctuation are forgiven;
    "Yes, because..." is "yes", but "I think yes" is a format failure.
    """
    head = text.strip().strip("\"'`*").lower()
    for label in sorted(labels, key=len, reverse=True):  # longest first: "not sure" before "not"
        lab = label.lower()
        if head.startswith(lab):
            rest = head[len(lab):]
            if not rest or not (rest[0].isalnum() or rest[0] == "_"):
                return label
    return None


# ---- text-to-SQL ------------------------------------------------------------------------------

_FENCE = re.compile(r"```(?:sql|sqlite)?\s*(.*?)(?:```|$)", re.IGNORECASE | re.DOTALL)


def extract_sql(text: str) -> str:
    """The SQL statement in a generation: inside a ``` fence if there is one, up to the first `;` or
    blank line (chat models like to explain their query after it)."""
    m = _FENCE.search(text)
    sql = m.group(1) if m else text
    sql = re.split(r";|\n\s*\n", sql.strip(), maxsplit=1)[0]
    return sql.strip()


class SqlResult(tuple):
    """(rows, error): rows is a list of tuples or None when the query failed; error is the message."""

    rows: list[tuple] | None
    error: str | None

    def __new__(cls, rows: list[tuple] | None, error: str | None) -> "SqlResult":
        obj = super().__new__(cls, (rows, error))
        obj.rows, obj.error = rows, error
        return obj


def open_sqlite(script: str) -> sqlite3.Connection:
    """An in-memory database built from a schema+rows SQL script, then made read-only, so a predicted
    `DROP TABLE` or `UPDATE` cannot change what later items are scored against."""
    con = sqlite3.connect(":memory:", check_same_thread=False)
    con.executescript(script)
    con.commit()
    con.execute("PRAGMA query_only = ON")
    # Model-written SQL may try more than reading: ATTACH would open (or create) any file the user can
    # reach, PRAGMA could turn query_only off. An authorizer lets through only what a SELECT needs.
    con.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    con.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 10_000_000)  # zeroblob(1e12) must fail, not eat the RAM
    con.set_authorizer(_select_only)
    return con


_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}


def _select_only(action: int, arg1: Any, arg2: Any, db: Any, trigger: Any) -> int:
    if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() == "load_extension":
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK if action in _ALLOWED else sqlite3.SQLITE_DENY


def run_sql(con: sqlite3.Connection, sql: str, timeout_s: float = 5.0, max_rows: int = 10_000) -> SqlResult:
    """Execute one read-only statement with a time limit; errors come back as values, never raised."""
    if not sql.strip():
        return SqlResult(None, "empty query")
    deadline = time.monotonic() + timeout_s
    # A runaway cross join must not hang the benchmark: SQLite calls this every 1000 VM steps.
    con.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 1000)
    try:
        cur = con.execute(sql)
        rows = cur.fetchmany(max_rows + 1)
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError) as err:
        return SqlResult(None, f"{type(err).__name__}: {err}")
    finally:
        con.set_progress_handler(None, 0)
    if len(rows) > max_rows:
        return SqlResult(None, f"more than {max_rows} rows")
    return SqlResult([tuple(r) for r in rows], None)


def _canon(value: Any) -> Any:
    # 3 == 3.0 in SQL; round floats so AVG() computed in a different order still matches.
    if isinstance(value, float):
        return round(value, 6) if value != int(value) else int(value)
    return value


def sql_match(con: sqlite3.Connection, predicted: str, gold: str) -> dict[str, Any]:
    """Score a predicted query against the gold one by executing both.

    Correct when the result sets are equal as multisets of rows (in order when the gold query has an
    ORDER BY, since then order is part of the answer). Invalid SQL is wrong (`valid` False).
    """
    gold_res = run_sql(con, gold)
    if gold_res.rows is None:
        raise ValueError(f"gold query fails: {gold_res.error}: {gold}")
    pred_res = run_sql(con, predicted)
    if pred_res.rows is None:
        return {"correct": False, "valid": False, "error": pred_res.error}
    pred_rows = [tuple(_canon(v) for v in r) for r in pred_res.rows]
    gold_rows = [tuple(_canon(v) for v in r) for r in gold_res.rows]
    if re.search(r"\border\s+by\b", gold, re.IGNORECASE):
        correct = pred_rows == gold_rows
    else:
        correct = Counter(pred_rows) == Counter(gold_rows)
    return {"correct": correct, "valid": True, "error": None}
