"""Shims over transformers versions: the KV-cache keyword and output name changed in 5.x."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["cache_kwarg", "output_cache"]


def cache_kwarg(model: PreTrainedModel) -> str:
    """The forward keyword that takes a KV cache: `cache` since transformers 5.x (`past_key_values` still works
    there with a FutureWarning and goes in 5.40), `past_key_values` before."""
    forward = getattr(model, "get_base_model", lambda: model)().forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)
