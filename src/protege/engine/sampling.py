"""Sampling parameters and the per-row next-token choice (greedy, temperature, top-k, top-p).

Reproducibility: every sampled request owns a `torch.Generator` seeded from its
`seed` and draws exactly one uniform number per token, so the same seed and the
same prompt give the same tokens whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..config import Sampling

__all__ = ["SamplingParams", "TokenLogprob", "choose_tokens", "token_logprobs", "make_generator"]

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI and vLLM cap top_logprobs

# top-p without top-k first looks among this many candidates (a partial sort of a 262K vocabulary is
# ~20x cheaper than a full one); it falls back to a full sort when they do not hold `top_p` of the mass.
_TOP_P_CANDIDATES = 1024


@dataclass
class SamplingParams:
    """How to sample one completion.

    `temperature == 0` is greedy. `top_k == 0` and `top_p == 1` disable those filters.
    `stop` strings end the completion and are not part of its text; `stop_token_ids` end it too
    (the id is kept in `token_ids`, not in the text); `None` means the chat format's stop ids and stop strings.
    `seed` makes sampling reproducible (ignored by greedy decoding).
    `logprobs`: None = none; k >= 0 = each sampled token's log-probability plus the k most likely
    alternatives (vLLM's meaning). They are the model's own distribution (log-softmax of its logits, before
    temperature / top-k / top-p, as vLLM's default `raw_logprobs`), so they do not depend on how one samples.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    logprobs: int | None = None
    json_schema: str | None = None  # a JSON schema the answer must satisfy (structured.py); None = free text

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be None or 0..{MAX_LOGPROBS}, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @classmethod
    def from_config(cls, s: "Sampling", seed: int | None = None, stop: list[str] | None = None) -> "SamplingParams":
        """The engine's parameters for a config's `Sampling` (and its extensions' `top_k`).

        Greedy decoding ignores the seed; leaving it out keeps identical greedy requests one cache entry."""
        return cls(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                   top_k=getattr(s, "top_k", 0), seed=seed if s.temperature > 0 else None, stop=list(stop or []))


@dataclass
class TokenLogprob:
    """One sampled token's log-probability and the `top` (id, log-probability) alternatives, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def token_logprobs(logits: torch.Tensor, chosen: list[int], k: list[int]) -> list[TokenLogprob]:
    """Log-probabilities of `chosen[i]` under row i of `logits` (n, V), with the `k[i]` best alternatives."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    picked = lp.gather(1, torch.tensor(chosen, device=lp.device)[:, None]).squeeze(1).tolist()
    kmax = min(max(k, default=0), lp.shape[-1])
    top_v, top_i = (torch.topk(lp, kmax, dim=-1) if kmax else (lp[:, :0], lp[:, :0].long()))
    top_v, top_i = top_v.tolist(), top_i.tolist()
    return [TokenLogprob(chosen[i], picked[i], list(zip(top_i[i][:k[i]], top_v[i][:k[i]]))) for i in range(len(chosen))]


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A private RNG for one request; without a seed it is drawn from torch's global RNG (so
    `torch.manual_seed` still makes a whole run reproducible)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _sample_row(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """One token from one row of logits (V,), drawing a single uniform number from `gen`."""
    x = logits.float() / params.temperature
    vocab = x.shape[-1]
    idx = None
    if params.top_k > 0:
        cand, idx = torch.topk(x, min(params.top_k, vocab))  # sorted, descending
        probs = torch.softmax(cand, -1)  # top-p (if any) then acts on the renormalized top-k, as in HF
    elif params.top_p < 1.0:
        lse = torch.logsumexp(x, -1)
        cand, idx = torch.topk(x, min(_TOP_P_CANDIDATES, vocab))
        if torch.exp(cand - lse).sum() < params.top_p:  # nucleus wider than the candidates: sort everything
            cand, idx = torch.sort(x, descending=True)
        probs = torch.exp(cand - lse)  # probabilities under the full vocabulary
    else:
        probs = torch.softmax(x, -1)
    if params.top_p < 1.0:
        before = torch.cumsum(probs, -1) - probs
        probs = torch.where(before < params.top_p, probs, torch.zeros_like(probs))  # the top token always stays
    cum = torch.cumsum(probs, -1)
    u = torch.rand(1, generator=gen, device=cum.device, dtype=cum.dtype) * cum[-1]
    pos = int(torch.searchsorted(cum, u).clamp_(max=cum.shape[-1] - 1).item())
    return pos if idx is None else int(idx[pos].item())


def choose_tokens(head, x: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator | None],
                  constraints: list | None = None) -> tuple[list[int], list[TokenLogprob | None]]:
    """Next token for each row of `x` (n, H hidden states, or (n, V) logits for `ModelHead`), and its
    log-probabilities for the rows whose params ask for them.

    Greedy rows go through `head.argmax` in one batch (cheap screened path); only sampled rows, rows that ask
    for log-probabilities and rows with a constraint (a function that masks a logits row in place: structured
    output) pay for full-vocabulary logits. A greedy token is the screened argmax whether or not
    log-probabilities were asked, so asking never changes the answer. Log-probabilities are the model's own,
    before any constraint.
    """
    constraints = constraints or [None] * len(params)
    tokens = [0] * len(params)
    greedy = [i for i, p in enumerate(params) if p.greedy and constraints[i] is None]
    if greedy:
        for i, t in zip(greedy, head.argmax(x[greedy]).tolist()):
            tokens[i] = t
    full = [i for i, p in enumerate(params) if not (p.greedy and constraints[i] is None) or p.logprobs is not None]
    logprobs: list[TokenLogprob | None] = [None] * len(params)
    if full:
        logits = head.logits(x[full])
        raw = logits
        if any(constraints[i] is not None for i in full) and any(params[i].logprobs is not None for i in full):
            raw = logits.clone()  # log-probabilities describe the model, not the mask
        for j, i in enumerate(full):
            if constraints[i] is not None:
                constraints[i](logits[j])
                tokens[i] = int(logits[j].argmax()) if params[i].greedy else _sample_row(logits[j], params[i], gens[i])
            elif not params[i].greedy:
                tokens[i] = _sample_row(logits[j], params[i], gens[i])
        asked = [j for j, i in enumerate(full) if params[i].logprobs is not None]
        if asked:
            rows = [full[j] for j in asked]
            found = token_logprobs(raw[asked], [tokens[i] for i in rows], [params[i].logprobs or 0 for i in rows])
            for i, tl in zip(rows, found):
                logprobs[i] = tl
    return tokens, logprobs
