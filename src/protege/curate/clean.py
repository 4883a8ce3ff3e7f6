"""`clean`: the ShareGPT rules Vicuna and Koala applied before training.

HTML -> Markdown (ShareGPT pages were scraped HTML), strip UI boilerplate ("Copy code",
"1 / 1", "Regenerate response"), drop empty turns, repair or drop broken role order,
drop conversations that mention the teacher product, and cut a trailing user turn so
every conversation ends with an answer.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from ..records import ROLE_ALIASES, Comparison, Conversation, Record
from .common import Context, StepResult, progress, removal
from .config import CleanStep

__all__ = ["apply", "html_to_markdown", "repair_roles", "teacher_pattern", "PhraseMatcher"]

# Only tags that ShareGPT's rendered pages actually contain trigger a conversion: running
# markdownify on text that merely mentions `<T>` in code would mangle it.
_HTML = re.compile(r"</?(?:p|div|br|pre|code|ul|ol|li|h[1-6]|strong|em|b|i|a|table|tr|td|th|span|blockquote)\b[^>]*>", re.I)


def html_to_markdown(text: str) -> str:
    """Markdown for text containing HTML tags; other text unchanged."""
    if "<" not in text or not _HTML.search(text):
        return text
    from markdownify import markdownify

    md = markdownify(text, heading_style="ATX", code_language="")
    return re.sub(r"\n{3,}", "\n\n", md).strip()


class PhraseMatcher:
    """Case-insensitive whole-phrase search for a list of phrases.

    A plain substring test on the lowercased text (C speed) rules out almost every text before
    the word-boundary regex runs: a 10-way alternation with `\\b` tried at every position was the
    slowest part of cleaning 100K conversations.
    """

    def __init__(self, phrases: tuple[str, ...]):
        self.phrases = tuple(p.lower() for p in phrases)
        parts = []
        for p in sorted(self.phrases, key=len, reverse=True):
            parts.append(("\\b" if p[:1].isalnum() else "") + re.escape(p) + ("\\b" if p[-1:].isalnum() else ""))
        self.pattern = re.compile("|".join(parts), re.I)

    def search(self, text: str) -> re.Match[str] | None:
        low = text.lower()
        if not any(p in low for p in self.phrases):
            return None
        return self.pattern.search(text)


@lru_cache(maxsize=32)
def teacher_pattern(phrases: tuple[str, ...]) -> PhraseMatcher | None:
    """A matcher for `phrases` (None when the list is empty)."""
    return PhraseMatcher(phrases) if phrases else None


def required_literal(pattern: str) -> str:
    """The longest run of plain characters every match of `pattern` must contain ("" if none).

    Used as a prefilter: `literal in text` is C-speed, and most texts contain none of the
    boilerplate literals, so the regexes (tried at every position) rarely run at all.
    """
    try:
        from re import _parser as sre_parse  # the stdlib's own regex parser
        parsed = sre_parse.parse(pattern)
    except Exception:  # noqa: BLE001 - no prefilter is always correct
        return ""
    if parsed.state.flags & re.IGNORECASE:
        return ""
    items = list(parsed)
    best, run = "", ""
    for op, av in items:  # top-level items are all mandatory
        if op is sre_parse.LITERAL:
            run += chr(av)
            best = max(best, run, key=len)
        else:
            run = ""
    return best


@lru_cache(maxsize=32)
def _boilerplate(patterns: tuple[str, ...]) -> list[tuple[str, re.Pattern[str]]]:
    return [(required_literal(p), re.compile(p, re.M)) for p in patterns]


def _clean_text(text: Any, opts: CleanStep) -> str:
    if not isinstance(text, str):
        return ""
    if opts.html_to_markdown:
        text = html_to_markdown(text)
    for literal, pat in _boilerplate(tuple(opts.boilerplate)):
        if literal in text:
            text = pat.sub("", text)
    return text.strip()


def repair_roles(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[str]]:
    """Make roles valid: known names, system only first, user/assistant alternating from a user turn.

    Consecutive same-role turns are merged (a split answer is still one answer); stray system
    messages and leading assistant turns are dropped. Returns (messages, list of repairs made).
    """
    fixes: list[str] = []
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        role = ROLE_ALIASES.get(str(m.get("role", "")).lower())
        if role is None:
            fixes.append(f"dropped turn {i} with unknown role {m.get('role')!r}")
            continue
        if role == "system":
            if out:
                fixes.append(f"dropped system message at turn {i}")
                continue
        elif not out or out[-1]["role"] == "system":
            if role == "assistant":
                fixes.append(f"dropped leading assistant turn {i}")
                continue
        elif out[-1]["role"] == role:
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n\n" + m["content"]}
            fixes.append(f"merged consecutive {role} turns at {i}")
            continue
        out.append({"role": role, "content": m["content"]})
    return out, fixes


def _roles_ok(messages: list[dict[str, str]]) -> bool:
    start = 1 if messages and messages[0]["role"] == "system" else 0
    return all(m["role"] == ("user" if (i - start) % 2 == 0 else "assistant")
               for i, m in enumerate(messages[start:], start=start))


def _clean_conversation(rec: Conversation, opts: CleanStep, teacher: PhraseMatcher | None) -> dict[str, Any] | None:
    for i, m in enumerate(rec.messages if isinstance(rec.messages, list) else []):
        content = m.get("content") if isinstance(m, dict) else None
        if content is not None and not isinstance(content, str):  # 42 is not an empty turn to repair
            return removal(rec, "invalid", f"messages[{i}].content: expected a string, got {type(content).__name__}")
    msgs = [{"role": m.get("role") if isinstance(m, dict) else None,
             "content": _clean_text(m.get("content") if isinstance(m, dict) else None, opts)}
            for m in (rec.messages if isinstance(rec.messages, list) else [])]
    n_empty = sum(1 for m in msgs if not m["content"])
    msgs = [m for m in msgs if m["content"]]
    if opts.roles == "drop" and not (all(m["role"] in ("system", "user", "assistant") for m in msgs) and _roles_ok(msgs)):
        return removal(rec, "broken_roles", "roles do not alternate user/assistant")
    msgs, _fixes = repair_roles(msgs)
    if opts.truncate_pairs:
        while msgs and msgs[-1]["role"] != "assistant":
            msgs.pop()
    if not any(m["role"] == "assistant" for m in msgs):
        why = f"{n_empty} empty turn(s)" if n_empty else "no user/assistant pair"
        return removal(rec, "empty", f"nothing left to train on: {why}")
    if teacher is not None:
        scope = ("assistant",) if opts.teacher_scope == "assistant" else ("user", "assistant", "system")
        for m in msgs:
            hit = teacher.search(m["content"]) if m["role"] in scope else None
            if hit:
                return removal(rec, "teacher_reference", f"{m['role']} mentions {hit.group(0)!r}")
    rec.messages = msgs
    return None


def _clean_comparison(rec: Comparison, opts: CleanStep, teacher: PhraseMatcher | None) -> dict[str, Any] | None:
    rec.prompt = [{**m, "content": _clean_text(m["content"], opts)} for m in rec.prompt]
    rec.chosen = {**rec.chosen, "content": _clean_text(rec.chosen["content"], opts)}
    rec.rejected = {**rec.rejected, "content": _clean_text(rec.rejected["content"], opts)}
    if not all(m["content"] for m in [*rec.prompt, rec.chosen, rec.rejected]):
        return removal(rec, "empty", "an empty prompt turn or response after cleaning")
    if teacher is not None:
        checked = [rec.chosen] + (rec.prompt if opts.teacher_scope == "all" else [])
        for m in checked:
            hit = teacher.search(m["content"])
            if hit:
                return removal(rec, "teacher_reference", f"{m['role']} mentions {hit.group(0)!r}")
    return None


def apply(records: list[Record], opts: CleanStep, ctx: Context | None = None) -> StepResult:
    """Clean every record in place; conversations that cannot be repaired are removed."""
    teacher = teacher_pattern(tuple(opts.teacher_phrases))
    kept, removed = [], []
    for rec in progress(records, "clean"):
        fn = _clean_comparison if isinstance(rec, Comparison) else _clean_conversation
        entry = fn(rec, opts, teacher)
        if entry is None:
            kept.append(rec)
        else:
            removed.append(entry)
    return StepResult(kept, removed)
