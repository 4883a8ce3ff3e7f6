"""`tag`: Koala-style conditional training data from comparisons.

Each Comparison becomes SFT conversations: the chosen answer under a positive marker and
(optionally) the rejected one under a negative marker. The model learns what each marker
means; at inference the positive marker is put in the prompt. The markers are recorded in
the manifest (`markers`) so the serving side can read them back.
"""

from __future__ import annotations

from typing import Any

from ..records import Comparison, Conversation, Record
from .common import StepResult
from .config import TagStep

__all__ = ["apply", "mark_prompt"]


def mark_prompt(prompt: list[dict[str, str]], marker: str, placement: str) -> list[dict[str, str]]:
    """The prompt with `marker` in the system message (prepended) or appended to the last user turn."""
    msgs = [dict(m) for m in prompt]
    if placement == "system":
        if msgs and msgs[0]["role"] == "system":
            msgs[0]["content"] = f"{marker}\n{msgs[0]['content']}"
        else:
            msgs.insert(0, {"role": "system", "content": marker})
    else:
        last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        msgs[last]["content"] = f"{msgs[last]['content']}\n\n{marker}"
    return msgs


def apply(records: list[Record], opts: TagStep, ctx: Any = None) -> StepResult:
    """Comparisons -> marked conversations `<id>:chosen` / `<id>:rejected` (one in, one or two out)."""
    out: list[Record] = []
    added = tagged = 0
    for rec in records:
        if isinstance(rec, Comparison):
            tagged += 1
            pairs = [("chosen", rec.chosen, opts.positive)]
            if opts.include_rejected:
                pairs.append(("rejected", rec.rejected, opts.negative))
            for label, answer, marker in pairs:
                msgs = [*mark_prompt(rec.prompt, marker, opts.placement), dict(answer)]
                out.append(Conversation(msgs, id=f"{rec.id}:{label}", source=rec.source,
                                        meta={**rec.meta, "tagged_from": rec.id, "marker": marker, "label": label}))
            added += len(pairs) - 1
        elif opts.conversations == "positive" and isinstance(rec, Conversation):
            msgs = [*mark_prompt(rec.messages[:-1], opts.positive, opts.placement), rec.messages[-1]]
            rec.messages = msgs
            rec.meta["marker"] = opts.positive
            out.append(rec)
        else:
            out.append(rec)
    return StepResult(out, [], added=added, stats={"comparisons_tagged": tagged,
                                                   "markers": {"positive": opts.positive, "negative": opts.negative,
                                                               "placement": opts.placement}})
