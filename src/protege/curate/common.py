"""What every curation step shares: the step result, text views of a record, normalization."""

from __future__ import annotations

import re
import string
import sys
import unicodedata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..records import Comparison, Record

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Context", "StepResult", "removal", "messages_of", "texts", "normalize", "words", "progress", "log", "PUNCT_TO_SPACE"]


def log(msg: str) -> None:
    """A `[curate]` line on stderr (stdout stays free for what the command prints)."""
    print(f"[curate] {msg}", file=sys.stderr, flush=True)


@dataclass
class Context:
    """What steps may need beyond their options: the run seed and cached tokenizers."""

    seed: int = 0
    tokenizers: dict[str, "PreTrainedTokenizerBase"] = field(default_factory=dict)

    def tokenizer(self, spec: str) -> "PreTrainedTokenizerBase":
        if spec not in self.tokenizers:
            from ..models import load_tokenizer

            self.tokenizers[spec] = load_tokenizer(spec)
        return self.tokenizers[spec]


@dataclass
class StepResult:
    """Kept records (in order), removal entries, records created (split/tag/mix repeats), stats for the card."""

    kept: list[Record]
    removed: list[dict[str, Any]] = field(default_factory=list)
    added: int = 0
    stats: dict[str, Any] = field(default_factory=dict)


def removal(rec: Record | None, reason: str, detail: str = "", rid: str | None = None, source: str = "") -> dict[str, Any]:
    """One `removed.jsonl` entry; the pipeline fills in `step`."""
    return {"id": rid if rid is not None else rec.id, "step": "", "reason": reason, "detail": detail,
            "source": rec.source if rec is not None else source}


def messages_of(rec: Record) -> list[dict[str, str]]:
    """A Conversation's messages; a Comparison's prompt plus its chosen answer."""
    if isinstance(rec, Comparison):
        return [*rec.prompt, rec.chosen]
    return rec.messages


def texts(rec: Record, scope: str = "all") -> list[str]:
    """Message texts of `scope`: all, user, assistant, first_user."""
    msgs = messages_of(rec)
    if scope == "all" or scope == "conversation":
        return [m["content"] for m in msgs]
    if scope == "first_user":
        return [next((m["content"] for m in msgs if m["role"] == "user"), "")]
    return [m["content"] for m in msgs if m["role"] == scope]


# Punctuation becomes a space before splitting: `str.translate` + `split` is several times faster than
# `re.findall(r"\w+")` over 100K documents, and dedup/decontamination only need word identity.
_PUNCT = {ord(c): " " for c in string.punctuation + "“”‘’«»„…—–·•¿¡、。，！？；：（）【】《》「」"}
PUNCT_TO_SPACE = _PUNCT
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lowercase, NFKC, punctuation dropped, whitespace collapsed: the key for exact matching."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).lower().translate(_PUNCT)).strip()


# Chinese/Japanese/Korean text has no spaces: each ideograph/kana/syllable counts as a word.
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def words(text: str) -> list[str]:
    """Lowercased words without punctuation (CJK characters one word each)."""
    text = text.lower()
    if not text.isascii():
        text = _CJK.sub(r" \g<0> ", text)
    return text.translate(_PUNCT).split()


def progress(items: Any, desc: str, total: int | None = None) -> Any:
    """A tqdm bar with rate on a terminal; silent otherwise (tests, CI logs)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, unit="rec", disable=None, leave=False, mininterval=1.0)
