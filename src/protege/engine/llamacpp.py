"""The engine interface over llama.cpp, so `protege serve FILE.gguf` and `protege chat FILE.gguf` run
quantized files at llama.cpp's speed with the same API, streaming, stop strings and errors.

One llama.cpp context decodes one sequence: `max_batch_size` is 1 and the server's scheduler queues
the rest (protege's own engine is the one that batches). Each request is a llama-cpp-python
`generate()` iterator advanced one token per `step()`, so cancellation and streaming work as with
the torch engine. Prompts are rendered by protege's ChatFormat with the HF tokenizer the model was
exported with (the `hf/` folder `protege export` writes next to the GGUF), so the ids are exactly
those training saw; llama.cpp only evaluates them.
"""

from __future__ import annotations

import itertools
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..chat import ChatFormat
from .core import Completion, RequestDriver, StepOutput
from .sampling import SamplingParams, TokenLogprob, token_logprobs
from .text import TextTracker

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["LlamaCppEngine"]


class _Req:
    def __init__(self, rid: int, prompt: list[int], params: SamplingParams, stop_ids: frozenset[int],
                 tracker: TextTracker):
        self.id, self.prompt, self.params, self.stop_ids, self.tracker = rid, prompt, params, stop_ids, tracker
        self.it: Iterator[int] | None = None
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None if params.logprobs is None else []


class LlamaCppEngine(RequestDriver):
    """`add_request` / `step` / `cancel` / `generate` over one llama.cpp context."""

    max_batch_size = 1

    def __init__(self, gguf: str | Path, tokenizer: PreTrainedTokenizerBase | None = None, n_ctx: int = 4096, threads: int | None = None):
        from .gguf import open_gguf
        from ..models import load_tokenizer  # the `hf/` folder beside an exported GGUF, else the GGUF's own

        self.path = Path(gguf)
        self.llm = open_gguf(self.path, n_ctx=n_ctx, threads=threads)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(self.path))
        self.chat_format = ChatFormat.from_tokenizer(self.tokenizer)
        self.max_positions = self.llm.n_ctx()
        self._ids = itertools.count()
        self._waiting: deque[_Req] = deque()
        self._active: _Req | None = None

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None) -> int:
        prompt, params, stop_ids, tracker = self._new_request(prompt_ids, params)
        req = _Req(next(self._ids), prompt, params, stop_ids, tracker)
        self._waiting.append(req)
        return req.id

    def cancel(self, request_id: int) -> None:
        if self._active is not None and self._active.id == request_id:
            self._active = None
            return
        for req in list(self._waiting):
            if req.id == request_id:
                self._waiting.remove(req)

    def option_logprobs(self, prompts: list[list[int]], options: list[list[int]]) -> Iterator[tuple[int, list[float]]]:
        """Yield (index, [log P(option's first token | prompt)]): one llama.cpp evaluation per prompt,
        reading the logits of its last position. Options are told apart by their first token (judge
        verdicts " A" / " B" / " tie" are one token each in the tokenizers llama.cpp runs), so options
        sharing a first token are refused. Not while a generation is in progress."""
        import numpy as np

        firsts = [o[0] for o in options]
        if len(set(firsts)) != len(firsts):
            raise ValueError(f"the llama.cpp backend scores options by their first token; {options} share one")
        if self.has_pending():
            raise RuntimeError("option_logprobs while requests are being generated")
        for i, ids in enumerate(prompts):
            ids = list(ids)
            # Keep the KV cache of the prefix this prompt shares with the last one evaluated (a judge's
            # two orders share the system prompt and the question): llama.cpp's `eval` drops the rest.
            prev = self.llm.input_ids[: self.llm.n_tokens].tolist()
            k = 0
            while k < min(len(prev), len(ids) - 1) and prev[k] == ids[k]:
                k += 1
            self.llm.n_tokens = k
            self.llm.eval(ids[k:])
            # llama-cpp-python no longer copies logits into `scores` unless logits_all; the context's
            # own buffer holds the last evaluated position's logits.
            z = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),)).astype(np.float64)
            top = z.max()
            lse = top + np.log(np.exp(z - top).sum())
            yield i, [float(z[t] - lse) for t in firsts]

    def has_pending(self) -> bool:
        return bool(self._waiting or self._active)

    def _start(self, req: _Req) -> None:
        p = req.params
        if not p.greedy and p.seed is not None:
            self.llm.set_seed(int(p.seed) % (1 << 32))
        greedy = p.greedy
        req.it = iter(self.llm.generate(req.prompt, top_k=1 if greedy else (p.top_k or 0),
                                        top_p=1.0 if greedy else p.top_p, min_p=0.0,
                                        temp=0.0 if greedy else p.temperature, repeat_penalty=1.0, reset=True))

    def step(self) -> list[StepOutput]:
        if self._active is None:
            if not self._waiting:
                return []
            self._active = self._waiting.popleft()
            self._start(self._active)
        req = self._active
        assert req.it is not None
        token = int(next(req.it))
        req.tokens.append(token)
        if req.logprobs is not None:
            req.logprobs.append(self._logprob(token, req.params.logprobs or 0))
        limit = min(req.params.max_new_tokens, self.max_positions - len(req.prompt))
        if token in req.stop_ids:
            return [self._finish(req, token, "", "stop")]
        delta, hit = req.tracker.push(token)
        if hit:
            return [self._finish(req, token, delta, "stop")]
        if len(req.tokens) >= limit:
            return [self._finish(req, token, delta + req.tracker.flush(), "length")]
        return [StepOutput(req.id, [token], delta, None, self._last_logprob(req))]

    def _logprob(self, token: int, k: int) -> TokenLogprob:
        """The log-probabilities behind `token`: llama-cpp-python's `generate` yields a token right after
        sampling it, so the context's logits buffer still holds the distribution it was drawn from."""
        import numpy as np
        import torch

        z = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
        return token_logprobs(torch.from_numpy(z.copy())[None], [token], [k])[0]

    @staticmethod
    def _last_logprob(req: _Req) -> list[TokenLogprob] | None:
        return None if req.logprobs is None else req.logprobs[-1:]

    def _finish(self, req: _Req, token: int, delta: str, reason: str) -> StepOutput:
        self._active = None
        done = Completion(req.tracker.text, list(req.tokens), len(req.prompt), len(req.tokens), reason,
                          None if req.logprobs is None else list(req.logprobs))
        return StepOutput(req.id, [token], delta, done, self._last_logprob(req))
