"""`score`: a reward model's score of each conversation's last answer, written to `meta[key]`.

LIMA picked its 1,000 examples by quality; `quality.top_k_by: rm_score` (optionally `top_k_diverse`) ranks by
what this step writes. The reward model is one `protege train rm` wrote (or any HF sequence classifier with
one output), scored with the same chat template and last-token read-out as in training.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from ..records import Conversation, Record
from .common import Context, StepResult
from .config import ScoreStep

if TYPE_CHECKING:
    import torch

    from ..chat import ChatFormat

__all__ = ["apply"]


@lru_cache(maxsize=2)
def _reward_model(spec: str) -> tuple[torch.nn.Module, ChatFormat]:
    """(model, chat format), loaded once per process (a stream brings many chunks)."""
    from ..chat import ChatFormat
    from ..train.rm import load_reward_model

    model, tok = load_reward_model(spec)
    return model, ChatFormat.from_tokenizer(tok)


def apply(records: list[Record], opts: ScoreStep, ctx: Context | None = None) -> StepResult:
    """Score every conversation that ends with an answer; comparisons and others pass through unscored."""
    from ..train.rm import score

    model, chat = _reward_model(opts.model)
    todo = [r for r in records if isinstance(r, Conversation) and r.messages and r.messages[-1]["role"] == "assistant"]
    values = score(model, chat, [r.messages[:-1] for r in todo], [r.messages[-1]["content"] for r in todo],
                   opts.batch_size, opts.max_length)
    for rec, value in zip(todo, values):
        rec.meta[opts.key] = round(float(value), 6)
    return StepResult(list(records), stats={"scored": len(todo), "unscored": len(records) - len(todo),
                                            "score_sum": float(sum(values))})
