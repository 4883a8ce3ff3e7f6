"""`split`: cut conversations longer than a token budget at turn boundaries (as FastChat did for Vicuna).

Each piece keeps the system message and whole user/assistant pairs, so every piece still
starts with a user turn and ends with an answer. Pieces get ids `<id>-part<k>` and
`meta.split_from`; the pipeline counts them as records added by this step.
"""

from __future__ import annotations

from typing import Callable

from ..records import Conversation, Record
from .common import Context, StepResult, removal
from .config import SplitStep

__all__ = ["apply", "split_conversation"]


def split_conversation(conv: Conversation, count: Callable[[list[str]], list[int]], max_tokens: int,
                       per_message: int = 6) -> list[tuple[list[dict[str, str]], int]]:
    """Pieces of `conv` as (messages, tokens), greedy: add pairs while the piece fits.

    `count` maps texts to token counts. A single pair over budget becomes its own piece.
    """
    msgs = conv.messages
    system = msgs[:1] if msgs and msgs[0]["role"] == "system" else []
    turns = msgs[len(system):]
    sizes = [n + per_message for n in count([m["content"] for m in msgs])]
    base = sizes[0] if system else 0
    turn_sizes = sizes[len(system):]
    pairs = [(turns[i:i + 2], sum(turn_sizes[i:i + 2])) for i in range(0, len(turns), 2)]
    pieces: list[tuple[list[dict[str, str]], int]] = []
    cur: list[dict[str, str]] = []
    cur_tokens = base
    for pair, tokens in pairs:
        if cur and cur_tokens + tokens > max_tokens:
            pieces.append((system + cur, cur_tokens))
            cur, cur_tokens = [], base
        cur = cur + pair
        cur_tokens += tokens
    if cur:
        pieces.append((system + cur, cur_tokens))
    return pieces


def apply(records: list[Record], opts: SplitStep, ctx: Context | None = None) -> StepResult:
    """Split conversations over `max_tokens`; comparisons pass through unchanged."""
    tok = ctx.tokenizer(opts.model) if ctx is not None else None
    if tok is None:
        from ..models import load_tokenizer

        tok = load_tokenizer(opts.model)

    def count(batch: list[str]) -> list[int]:
        return [len(ids) for ids in tok(batch, add_special_tokens=False)["input_ids"]]

    kept, removed, added, n_split = [], [], 0, 0
    for rec in records:
        if not isinstance(rec, Conversation):
            kept.append(rec)
            continue
        pieces = split_conversation(rec, count, opts.max_tokens, opts.tokens_per_message)
        if opts.drop_oversized:
            pieces = [p for p in pieces if p[1] <= opts.max_tokens]
            if not pieces:
                removed.append(removal(rec, "too_long", f"every user/assistant pair is over {opts.max_tokens} tokens"))
                continue
        if len(pieces) == 1:
            rec.messages = pieces[0][0]
            kept.append(rec)
            continue
        n_split += 1
        added += len(pieces) - 1
        for k, (msgs, _) in enumerate(pieces):
            kept.append(Conversation(msgs, id=f"{rec.id}-part{k}", source=rec.source,
                                     meta={**rec.meta, "split_from": rec.id, "part": k}))
    return StepResult(kept, removed, added=added, stats={"conversations_split": n_split, "pieces_added": added})
