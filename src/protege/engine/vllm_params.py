"""protege's `SamplingParams` as vLLM's, with the stops protege's own engines use (the chat format's stop ids and
strings unless the request names its own). One conversion for the vLLM teacher and the vLLM rollout engines.
vLLM is imported when called: it is an optional dependency with its own virtualenv."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .driver import request_stops

if TYPE_CHECKING:
    from ..chat import ChatFormat
    from .sampling import SamplingParams

__all__ = ["vllm_sampling"]


def vllm_sampling(p: SamplingParams, chat: ChatFormat, logprobs: int | None = None) -> Any:
    """`vllm.SamplingParams` for one request; `logprobs=0` asks for each sampled token's log-probability."""
    from vllm import SamplingParams as VSampling

    stop_ids, stops = request_stops(chat, p)
    return VSampling(max_tokens=int(p.max_new_tokens), temperature=float(p.temperature), top_p=float(p.top_p),
                     top_k=int(p.top_k) or -1, seed=p.seed, stop=stops or None, stop_token_ids=sorted(stop_ids),
                     skip_special_tokens=True, logprobs=logprobs)
