"""The engine: continuous batching over a ragged KV cache for any transformers causal LM.

Loop shape (gpt-fast style, see `step`): admit waiting requests into free rows and
prefill them together (logits only for each prompt's last position), then decode
one token for every running row in a single forward. Requests join and leave
between steps; a finished row is compacted away at once, so batch size tracks
the live requests.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..chat import ChatFormat
from ..models import cache_kwarg
from .cache import SlotCache
from .driver import Completion, RequestDriver, StepOutput, request_stops
from .sampling import SamplingParams, TokenLogprob, choose_tokens, make_generator
from .text import TextTracker

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers import PreTrainedTokenizerBase

__all__ = ["Engine", "Completion", "StepOutput", "RequestDriver", "request_stops"]  # the last ones: driver.py


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    text: TextTracker
    gen: torch.Generator | None
    out: list[int] = field(default_factory=list)
    out_logprobs: list[TokenLogprob] | None = None  # a list when params.logprobs asks for them
    matcher: Any = None  # structured output: the request's grammar state (structured.py)
    row: int = -1  # cache row while running
    start: int = 0  # first valid cache index of this row (left padding before it)
    length: int = 0  # next cache index to write (= start + tokens in cache)
    next_token: int = -1  # sampled, not yet fed to the model


class Engine(RequestDriver):
    """Batched generation with a KV cache (see the package docstring for the API).

    model/tokenizer: any transformers causal LM and its tokenizer, on any device (the model's).
    chat_format: prompt template + default stop ids/strings; default `ChatFormat.from_tokenizer`.
    max_batch_size: rows decoded together; more requests wait and join as rows free up.
    weights: "fp32" (the model as loaded) or "int8" (CPU; quantizes the decoder's Linears in place).
    prefill_tokens: at most this many padded prompt tokens are prefilled in one forward.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, chat_format: ChatFormat | None = None,
                 max_batch_size: int = 16, weights: str = "fp32", prefill_tokens: int = 4096):
        if weights not in ("fp32", "int8"):
            raise ValueError(f"weights must be 'fp32' or 'int8', got {weights!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat_format = chat_format or ChatFormat.from_tokenizer(tokenizer)
        self.max_batch_size = max_batch_size
        self.prefill_tokens = prefill_tokens  # padded prompt tokens per prefill forward (memory bound)
        self.weights = weights
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._body, self._head = _split_model(model, tokenizer, weights, self.device)
        self._cache_kw = cache_kwarg(self._body if self._body is not None else model)
        cfg = model.config
        self.max_positions = getattr(cfg, "max_position_embeddings", None) or 1 << 30
        self.layer_types = sorted(set(getattr(cfg, "layer_types", None) or ["full_attention"]))
        self.sliding_window = getattr(cfg, "sliding_window", None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.cache = SlotCache(max_batch_size, self.device, self.dtype)
        self._ids = itertools.count()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []  # index == cache row

    @classmethod
    def from_spec(cls, spec: str, dtype: str = "float32", device: str | None = None, **kw: Any) -> "Engine":
        """Load a model by alias / folder / .gguf (`protege.models.load`) and wrap it."""
        from ..models import load

        model, tok = load(spec, dtype=dtype, device=device)
        return cls(model, tok, **kw)

    def option_logprobs(self, prompts: list[list[int]], options: list[list[int]]) -> Any:
        """Yield (index, [log P(option | prompt) for each option's tokens]) per prompt (see `choices.py`)."""
        from .choices import torch_option_logprobs

        yield from torch_option_logprobs(self.model, prompts, options, self.pad_id,
                                         batch_size=max(1, min(self.max_batch_size, 8)))

    supports_structured_output = True

    @property
    def structured(self) -> Any:
        """xgrammar over this engine's vocabulary, built on first use (StructuredOutputError without xgrammar)."""
        if getattr(self, "_structured", None) is None:
            from .structured import StructuredOutput

            vocab = int(getattr(self.model.config, "vocab_size", 0) or len(self.tokenizer))
            self._structured = StructuredOutput(self.tokenizer, vocab)
        return self._structured

    def refresh_weights(self) -> None:
        """Call after the model's weights changed (e.g. between PPO updates): the int8 copy of the LM
        head that screens greedy tokens is rebuilt from the current weights."""
        if hasattr(self._head, "refresh"):
            self._head.refresh()

    # ---- request lifecycle ----------------------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None) -> int:
        """Queue a prompt; it joins the running batch at the next `step()`. Returns its id."""
        prompt, params, stop_ids, tracker = self._new_request(prompt_ids, params)
        gen = None if params.greedy else make_generator(params.seed, self.device)
        matcher = self.structured.matcher(params.json_schema, sorted(stop_ids)) if params.json_schema else None
        req = _Request(next(self._ids), prompt, params, stop_ids, tracker, gen,
                       out_logprobs=None if params.logprobs is None else [], matcher=matcher)
        self._waiting.append(req)
        return req.id

    @torch.inference_mode()
    def cancel(self, request_id: int) -> None:
        """Drop a waiting or running request (its row is freed at once); unknown ids are ignored."""
        for req in list(self._waiting):
            if req.id == request_id:
                self._waiting.remove(req)
                return
        for req in self._running:
            if req.id == request_id:
                self._release(req)
                return

    def has_pending(self) -> bool:
        return bool(self._waiting or self._running)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Admit + prefill waiting requests, then decode one token for the others. Returns new tokens."""
        outputs: list[StepOutput] = []
        old = list(self._running)
        new = self._admit(outputs)
        if new:
            logits = self._prefill(new)
            outputs += self._accept(new, logits)
        old = [r for r in old if r.row >= 0]
        if old:
            logits = self._decode(old)
            outputs += self._accept(old, logits)
        return outputs

    # ---- internals ------------------------------------------------------------------------------

    def _admit(self, outputs: list[StepOutput]) -> list[_Request]:
        """Move waiting requests into free rows while the padded prefill stays within budget."""
        new: list[_Request] = []
        width = 0
        while self._waiting and len(self._running) < self.max_batch_size:
            cand = self._waiting[0]
            if cand.params.max_new_tokens == 0:  # nothing to generate: finish without a forward
                self._waiting.popleft()
                outputs.append(StepOutput(cand.id, [], "", Completion("", [], len(cand.prompt), 0, "length",
                                                                      cand.out_logprobs)))
                continue
            w = max(width, len(cand.prompt))
            if new and w * (len(new) + 1) > self.prefill_tokens:
                break
            width = w
            req = self._waiting.popleft()
            req.row = len(self._running)
            self._running.append(req)
            new.append(req)
        return new

    def _release(self, req: _Request) -> None:
        """Free `req`'s row, moving the last running row into it so rows stay 0..n-1."""
        last = self._running[-1]
        if last is not req:
            self.cache.move_row(last.row, req.row, last.length)
            last.row = req.row
            self._running[req.row] = last
        self._running.pop()
        req.row = -1
        if not self._running and not self._waiting:
            self.cache.clear()  # idle: give the KV memory back (it is re-allocated lazily)

    def _mask(self, q_index: torch.Tensor, start: torch.Tensor, kv_len: int) -> dict[str, torch.Tensor]:
        """Additive masks (n, 1, q, kv_len) per layer type. q_index: (n, q) cache index of each query.

        A key k is visible to query q when start <= k <= q (and q - k < window on sliding layers).
        A left-padding query sees only itself: finite garbage, never a NaN that could leak into the cache.
        """
        k = torch.arange(kv_len, device=self.device)[None, None, :]  # (1, 1, K)
        q = q_index[:, :, None]  # (n, q, 1)
        causal = k <= q
        visible = causal & ((k >= start[:, None, None]) | (k == q))
        neg = torch.finfo(self.dtype).min
        masks = {}
        for lt in self.layer_types:
            vis = visible
            if lt == "sliding_attention" and self.sliding_window:
                vis = vis & (q - k < self.sliding_window)
            m = torch.zeros(vis.shape, device=self.device, dtype=self.dtype).masked_fill_(~vis, neg)
            masks[lt] = m[:, None]
        return masks

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last position's hidden state (n, H), or its logits (n, V) when the head is the model's own."""
        attn = masks if len(masks) > 1 or "full_attention" not in masks else masks["full_attention"]
        kw = dict(input_ids=input_ids, attention_mask=attn, position_ids=positions, use_cache=True)
        kw[self._cache_kw] = self.cache
        if self._body is None:
            return self.model(**kw, logits_to_keep=1).logits[:, -1, :]
        return self._body(**kw).last_hidden_state[:, -1, :]

    def _prefill(self, new: list[_Request]) -> torch.Tensor:
        width = max(len(r.prompt) for r in new)
        rows = slice(new[0].row, new[-1].row + 1)
        ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(new):
            r.start, r.length = width - len(r.prompt), width
            ids[i, r.start:] = torch.tensor(r.prompt)
        start = torch.tensor([r.start for r in new], device=self.device)
        q_index = torch.arange(width, device=self.device)[None, :].expand(len(new), width)
        positions = (q_index - start[:, None]).clamp(min=0)
        self.cache.for_prefill(rows, width)
        return self._forward(ids.to(self.device), positions, self._mask(q_index, start, width))

    def _decode(self, reqs: list[_Request]) -> torch.Tensor:
        n = len(reqs)
        assert [r.row for r in reqs] == list(range(n)), "decode expects the rows 0..n-1"
        ids = torch.tensor([[r.next_token] for r in reqs], device=self.device)
        write_at = torch.tensor([r.length for r in reqs], device=self.device)
        start = torch.tensor([r.start for r in reqs], device=self.device)
        kv_len = int(write_at.max()) + 1
        self.cache.for_decode(n, write_at, kv_len)
        logits = self._forward(ids, (write_at - start)[:, None], self._mask(write_at[:, None], start, kv_len))
        for r in reqs:
            r.length += 1
        return logits

    def _accept(self, reqs: list[_Request], logits: torch.Tensor) -> list[StepOutput]:
        """Sample one token per request, update text/stop state, release finished rows."""
        constraints = [r.matcher.mask if r.matcher is not None else None for r in reqs]
        tokens, logprobs = choose_tokens(self._head, logits, [r.params for r in reqs], [r.gen for r in reqs],
                                         constraints if any(constraints) else None)
        outputs, finished = [], []
        for r, tok, lp in zip(reqs, tokens, logprobs):
            if r.matcher is not None and not r.matcher.accept(tok):
                raise RuntimeError(f"structured output: token {tok} was chosen outside the grammar's mask")
            r.out.append(tok)
            if r.out_logprobs is not None and lp is not None:
                r.out_logprobs.append(lp)
            r.next_token = tok
            reason = None
            if tok in r.stop_ids:
                delta, reason = r.text.flush(), "stop"
            else:
                delta, hit = r.text.push(tok)
                if hit:
                    reason = "stop"
                elif len(r.out) >= r.params.max_new_tokens or r.length - r.start >= self.max_positions:
                    reason = "length"
                    delta += r.text.flush()
            done = None
            if reason is not None:
                done = Completion(r.text.text, list(r.out), len(r.prompt), len(r.out), reason,
                                  None if r.out_logprobs is None else list(r.out_logprobs))
                finished.append(r)
            outputs.append(StepOutput(r.id, [tok], delta, done, None if lp is None else [lp]))
        for r in finished:
            self._release(r)
        return outputs


def _split_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, weights: str, device: torch.device) -> tuple[Any, Any]:
    """(decoder or None, head) for this model and weight mode; int8 mode quantizes Linear layers in place."""
    from torch import nn

    from ..lm_head import lm_head_parts
    from .head import LinearHead, ModelHead, ScreenedHead
    from .int8 import quantize_decoder

    head = model.get_output_embeddings()
    if weights == "int8":
        if device.type != "cpu":
            raise ValueError("weights='int8' is a CPU mode (fbgemm dynamic int8); use fp32/bf16 models on accelerators")
        # The head stays fp32 here: ScreenedHead scans it with its own int8 copy and rescores the leaders in fp32.
        # down_proj stays fp32: its input (gelu(gate) * up) has the worst outliers; quantizing it too cut
        # greedy agreement with fp32 on gemma-3-270m from ~47% to ~13% of tokens for ~15% fewer bytes.
        quantize_decoder(model, tokenizer, skip=head, exclude=("down_proj",))
    parts = lm_head_parts(model)  # the same rule training uses
    if parts is None:
        return None, ModelHead()
    body, softcap = parts.decoder, parts.softcap
    if device.type == "cpu" and type(head) is nn.Linear and head.weight.dtype in (torch.float32, torch.bfloat16):
        return body, ScreenedHead(head, softcap)
    return body, LinearHead(head, softcap)
