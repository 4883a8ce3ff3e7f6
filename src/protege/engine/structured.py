"""Structured output (OpenAI's `response_format` JSON modes) through xgrammar, the grammar engine vLLM uses.

Each step, a request with a JSON schema gets a token mask from its grammar matcher: tokens that cannot
continue a document valid under the schema get -inf before the token is chosen (greedy or sampled),
and the end-of-turn ids are allowed only once the document is complete. Whitespace between tokens of
the JSON is not free (`any_whitespace=False`): a small model otherwise pads with newlines until its
token budget runs out. xgrammar is an optional dependency (`pip install 'protege[structured]'`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["StructuredOutput", "StructuredOutputError", "JSON_OBJECT"]

JSON_OBJECT = '{"type": "object"}'  # response_format {"type": "json_object"}: any JSON object


class StructuredOutputError(ValueError):
    """The schema cannot be compiled, or xgrammar is not installed."""


class _Matcher:
    """One request's grammar state: `mask(logits_row)` in place, then `accept(token)`."""

    def __init__(self, matcher: Any, xgr: Any, vocab_size: int):
        self.matcher, self.xgr = matcher, xgr
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, row: torch.Tensor) -> None:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self.xgr.apply_token_bitmask_inplace(row[None], self.bitmask.to(row.device))

    def accept(self, token: int) -> bool:
        return bool(self.matcher.accept_token(int(token)))


class StructuredOutput:
    """Per engine: the tokenizer's vocabulary as xgrammar sees it, compiled schemas (cached), matchers."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int):
        try:
            import xgrammar
        except ImportError:
            raise StructuredOutputError("JSON output needs xgrammar: pip install 'protege[structured]'") from None
        self.xgr, self.vocab_size = xgrammar, vocab_size
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgrammar.GrammarCompiler(self.info)
        self._compiled: dict[str, Any] = {}

    def check(self, schema: str) -> None:
        """Compile `schema` now (a bad one is the caller's error, before any generation)."""
        if schema not in self._compiled:
            try:
                json.loads(schema)
                self._compiled[schema] = self.compiler.compile_json_schema(schema, any_whitespace=False)
            except Exception as err:  # noqa: BLE001 — xgrammar raises several kinds; all mean "bad schema"
                raise StructuredOutputError(f"the JSON schema cannot be used: {err}") from None

    def matcher(self, schema: str, stop_ids: list[int]) -> _Matcher:
        self.check(schema)
        return _Matcher(self.xgr.GrammarMatcher(self._compiled[schema], override_stop_tokens=list(stop_ids)),
                        self.xgr, self.vocab_size)


Constraint = Callable[[torch.Tensor], None]
