"""`tag`: Koala-style conditional training data from comparisons.

Each Comparison becomes SFT conversations: the chosen answer under a positive marker and
(optionally) the rejected one under a negative marker. The model learns what each marker
means; at inference the positive marker is put in the prompt. The markers are recorded in
the manifest (`markers`) so the serving side can read them back.
"""

from __future__ import annotations


from ..records import Comparison, Conversation, Record
from ..chat import mark_prompt
from .common import Context, StepResult
from .config import TagStep

__all__ = ["apply", "mark_prompt"]  # mark_prompt lives in chat.py: serving applies it too


def apply(records: list[Record], opts: TagStep, ctx: Context | None = None) -> StepResult:
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
