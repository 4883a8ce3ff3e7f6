"""Incremental detokenization with stop strings, for text deltas that never need retracting.

Each step re-decodes the request's generated ids (cheap next to a forward pass) so
multi-byte characters and SentencePiece spaces come out exactly as a one-shot
`decode` would. A delta holds back (a) a trailing U+FFFD, i.e. a UTF-8 character
whose bytes have not all arrived, and (b) any tail that could be the start of a
stop string, so a stop string split across tokens is never emitted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["TextTracker"]


def _held_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class TextTracker:
    """Turns a growing list of token ids into text deltas; finds stop strings."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []  # ids that count as text (a final stop id is never added)
        self.text = ""  # decoded text so far, cut at a stop string once one is found
        self.emitted = 0  # characters of `text` already handed out as deltas

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one generated id; returns (delta, stop_string_found). After a stop the text is final."""
        self.ids.append(token_id)
        self.text = self._decode()
        if self.stops:
            hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self.flush(), True
        settled = self.text.rstrip("\ufffd")  # a trailing U+FFFD is an incomplete UTF-8 sequence
        safe = len(settled) - _held_suffix(settled, self.stops)
        return self._emit(safe), False

    def flush(self) -> str:
        """Everything not yet emitted (call when the request finishes)."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted:upto]
        self.emitted = upto
        return delta
