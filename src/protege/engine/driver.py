"""What every engine shares: the results of a request (`Completion`, `StepOutput`) and `RequestDriver`, which
gives `generate` / `chat` / `stream` to any engine that implements add_request / step / has_pending / cancel
(protege's torch engine in `core.py`, llama.cpp in `llamacpp.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from ..chat import ChatFormat
from .sampling import SamplingParams, TokenLogprob
from .text import TextTracker

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Completion", "StepOutput", "RequestDriver", "request_stops"]


@dataclass
class Completion:
    """A finished request. `token_ids` are every sampled id: a final stop id if one ended it, or all ids up
    to the one that completed a stop string. `text` never holds special tokens, a stop id or the stop string.
    `finish_reason` is "stop" (stop id or string) or "length" (max_new_tokens or the model's context).
    `logprobs`: one entry per id of `token_ids` when the request's params asked for them, else None."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None


@dataclass
class StepOutput:
    """What one `step()` produced for one request; `finished` is set on its last step. `logprobs` has one
    entry per id of `token_ids` when the request asked for them."""

    request_id: int
    token_ids: list[int]
    text_delta: str
    finished: Completion | None = None
    logprobs: list[TokenLogprob] | None = None


def request_stops(fmt: ChatFormat, params: SamplingParams) -> tuple[frozenset[int], list[str]]:
    """(stop ids, stop strings) of one request: the chat format's, unless the caller gave its own ids."""
    stop_ids = fmt.stop_token_ids if params.stop_token_ids is None else params.stop_token_ids
    stops = list(params.stop) + (list(fmt.stop_strings) if params.stop_token_ids is None else [])
    return frozenset(stop_ids), stops


class RequestDriver:
    """`generate` / `chat` / `stream` for any engine with add_request / step / has_pending / cancel."""

    chat_format: ChatFormat
    tokenizer: PreTrainedTokenizerBase
    max_positions: int

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[Completion]:
        """Complete every prompt (token ids); results come back in prompt order."""
        if self.has_pending():
            raise RuntimeError("generate() needs an idle engine; this one has requests from add_request()")
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        done: dict[int, Completion] = {}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="seq")
        try:
            while self.has_pending():
                for out in self.step():
                    if out.finished is not None:
                        done[out.request_id] = out.finished
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            for rid in ids:  # interrupted (e.g. KeyboardInterrupt): leave the engine idle
                if rid not in done:
                    self.cancel(rid)
        return [done[i] for i in ids]

    def chat(self, conversations: list[list[dict]], params: SamplingParams | list[SamplingParams] | None = None,
             progress: bool = False) -> list[Completion]:
        """Answer each conversation (a list of {"role", "content"} ending with a user turn)."""
        prompts = [self.chat_format.encode_prompt(c) for c in conversations]
        return self.generate(prompts, params, progress)

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one completion as they are decoded (their concatenation is the full text)."""
        if self.has_pending():
            raise RuntimeError("stream() needs an idle engine; this one has requests from add_request()")
        rid = self.add_request(prompt_ids, params)
        try:
            while self.has_pending():
                for out in self.step():
                    if out.request_id == rid and out.text_delta:
                        yield out.text_delta
        finally:
            self.cancel(rid)

    def _new_request(self, prompt_ids: list[int], params: SamplingParams | None
                     ) -> tuple[list[int], SamplingParams, frozenset[int], TextTracker]:
        """A request's checked prompt, params, stop ids and text tracker (shared by every engine)."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("a prompt needs at least one token (e.g. the BOS token)")
        if len(prompt) >= self.max_positions:
            raise ValueError(f"prompt has {len(prompt)} tokens; the model takes at most {self.max_positions}")
        stop_ids, stops = request_stops(self.chat_format, params)
        return prompt, params, stop_ids, TextTracker(self.tokenizer, stops)

    # implemented by engines
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None) -> int:
        raise NotImplementedError

    def step(self) -> list[StepOutput]:
        raise NotImplementedError

    def has_pending(self) -> bool:
        raise NotImplementedError

    def cancel(self, request_id: int) -> None:
        raise NotImplementedError
