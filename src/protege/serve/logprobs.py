"""OpenAI's `logprobs` object from the engine's per-token log-probabilities.

`{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}, ...],
"refusal": null}`: one entry per token of the answer's text. Special tokens (the end-of-turn id that
stopped the answer) are left out, as the text leaves them out; they may still appear among the
alternatives, which describe the model's whole distribution.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from ..engine.sampling import TokenLogprob

__all__ = ["LogprobFormatter"]

# JSON has no -inf; vLLM writes this number for a token the model gives probability 0.
_FLOOR = -9999.0


class LogprobFormatter:
    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer

    @functools.cached_property
    def _bytes(self) -> Any:  # built on the first request that asks (it walks the vocabulary once)
        from ..tokens import TokenBytes

        return TokenBytes(self.tokenizer)

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        raw = self._bytes.bytes_of(token_id)
        return {"token": self._bytes.text_of(token_id), "logprob": logprob if math.isfinite(logprob) else _FLOOR,
                "bytes": list(raw)}

    def content(self, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
        out = []
        for e in entries:
            if self._bytes.is_special(e.token_id):
                continue
            item = self._token(e.token_id, e.logprob)
            item["top_logprobs"] = [self._token(t, lp) for t, lp in e.top]
            out.append(item)
        return out

    def choice(self, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        """A choice's `logprobs` field: None when the request did not ask for them."""
        return None if entries is None else {"content": self.content(entries), "refusal": None}
