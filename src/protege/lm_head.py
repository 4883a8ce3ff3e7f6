"""The one rule for `logits = head(decoder(x))`, shared by the engine and every trainer.

Running the decoder and the LM head separately is what lets protege put the head only
where it is needed: the last position when generating, the labelled positions when
training. That is only correct for architectures whose causal-LM forward is exactly
`lm_head(final_norm(decoder(x)))` (+ Gemma's optional final soft-capping); for any other
`lm_head_parts` returns None and callers use the model's own forward (or refuse).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

__all__ = ["PLAIN_HEAD_TYPES", "LMHeadParts", "lm_head_parts", "head_rows", "embed_inputs", "fp32_head"]

# model_type values whose forward is `lm_head(decoder(...))`, checked against each family's modeling code.
PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                              "smollm3", "olmo", "olmo2", "starcoder2"})

RowOverride = tuple[torch.Tensor, torch.Tensor]  # (token ids (k,), their head rows (k, H))


@dataclass(frozen=True)
class LMHeadParts:
    decoder: torch.nn.Module  # returns `last_hidden_state` (B, T, H) after the final norm
    head: torch.nn.Module  # the output embedding: nn.Linear (V, H), or PEFT's trainable-tokens wrapper of it
    softcap: float | None  # Gemma's final_logit_softcapping: logits = c * tanh(z / c)


def lm_head_parts(model: torch.nn.Module) -> LMHeadParts | None:
    """(decoder, head, softcap) of a causal LM (plain or PEFT-wrapped), or None if its forward is not plain."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    head = base.get_output_embeddings()
    if head is None or getattr(cfg, "model_type", "") not in PLAIN_HEAD_TYPES:
        return None
    if getattr(_base_layer(head), "bias", None) is not None or getattr(cfg, "logit_scale", None):
        return None
    return LMHeadParts(getattr(base, base.base_model_prefix), head, getattr(cfg, "final_logit_softcapping", None))


def _base_layer(head: torch.nn.Module) -> torch.nn.Module:
    layer = getattr(head, "token_adapter", None)
    return layer.base_layer if layer is not None else head


def head_rows(head: torch.nn.Module) -> tuple[torch.Tensor, RowOverride | None]:
    """(frozen head weight (V, H), (ids, trainable rows) or None) of a plain or PEFT-trainable-tokens head.

    PEFT's trainable tokens keep the head frozen and train a (k, H) delta for k token rows; the
    losses apply those rows themselves rather than materialising a merged (V, H) weight per step.
    """
    layer = getattr(head, "token_adapter", None)
    if layer is None or not layer.active_adapters or layer.disable_adapters:
        return _base_layer(head).weight, None
    name = layer.active_adapters[0]
    ids = torch.tensor(layer.token_indices[name], device=layer.base_layer.weight.device)
    return layer.base_layer.weight, (ids, layer.trainable_tokens_delta[name])


def embed_inputs(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Input embeddings (B, T, H) when the embedding carries PEFT trainable-token rows, else None.

    PEFT builds `weight.index_copy(ids, delta)`, a full (V, H) copy per forward, and its backward a
    dense (V, H) gradient: for gemma-3-270m's 262K x 640 embedding a 671 MB copy and a 1.1 s zero-fill
    per training step (10% of an SFT step here). Looking up the frozen rows and swapping in the k
    trainable ones gives the same values and sends gradient only to those k rows.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer = getattr(base.get_input_embeddings(), "token_adapter", None)
    if layer is None or not layer.active_adapters or layer.disable_adapters:
        return None
    name = layer.active_adapters[0]
    ids = torch.tensor(layer.token_indices[name], device=input_ids.device)
    rows = layer.trainable_tokens_delta[name]  # (k, H): the trainable rows themselves
    frozen = layer.base_layer(input_ids)  # (B, T, H), with the module's own scaling (Gemma: * sqrt(H))
    scale = getattr(layer.base_layer, "embed_scale", None)
    hit = input_ids[..., None] == ids  # (B, T, k)
    picked = (hit.to(rows.dtype) @ rows)  # (B, T, H): the trainable row where an id matches, else 0
    if scale is not None:
        picked = picked * scale.to(picked.dtype)
    # The trainable rows are fp32 (master weights); the decoder takes its own storage dtype (bf16 in a
    # low-precision run), so the swapped-in rows are rounded to it as every other input row is.
    return torch.where(hit.any(-1, keepdim=True), picked.to(frozen.dtype), frozen)


@contextlib.contextmanager
def fp32_head(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, a bf16/fp16 model's LM head computes its logits in fp32 (one fp32 copy of the
    head's weight for the block).

    Log-likelihood scoring compares a handful of options by their summed log-probs; bf16 logits
    carry 8 bits of mantissa, so two options' first-token logits often round to the same value and the
    argmax falls to the first. On gemma-3-270m's world-knowledge set a bf16 head flipped 3 of 80
    answers against fp32; the decoder's own bf16 error is much smaller than that rounding. A fp32 model,
    or a head that is not a plain Linear, is left alone."""
    import torch.nn.functional as F

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.weight.dtype == torch.float32:
        yield
        return
    weight = head.weight.detach().float()
    bias = None if head.bias is None else head.bias.detach().float()
    head.forward = lambda x: F.linear(x.float(), weight, bias)  # instance attribute shadows the method
    try:
        yield
    finally:
        del head.forward
