"""int8 weight mode: every decoder Linear becomes a SmoothQuant-ed dynamic int8 Linear (CPU, fbgemm).

Why SmoothQuant: fbgemm's dynamic int8 Linear quantizes activations with one scale per
tensor, and Gemma's normalized activations have a few channels 20-50x larger than the
rest, so plain int8 rounds most channels to a handful of levels (greedy agreement with
fp32 fell to ~10% of tokens). Dividing each input channel by s_j and multiplying the
weight's column j by s_j leaves the product unchanged and moves the outliers into the
weights, which are quantized per output channel (Xiao et al. 2023, alpha = 0.5).
s_j comes from a short calibration pass over built-in sentences at load time.

Measured on gemma-3-270m (greedy, 6 prompts x 24 tokens, share of tokens identical to fp32):
plain int8 everywhere 13%; SmoothQuant everywhere 13% (alpha 0.5) / 22% (alpha 0.8); MLP only 33%;
attention only 72%; everything but `down_proj` 47% (the engine's choice: most of the bytes saved,
a usable agreement). The LM head is not quantized here (see head.ScreenedHead).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .head import int8_linear

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers import PreTrainedTokenizerBase

__all__ = ["SmoothInt8Linear", "quantize_decoder"]

_ALPHA = 0.5  # share of the outlier range moved into the weights
_CALIBRATION = [
    "The capital of France is Paris, a city on the Seine known for its museums and cafes.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Question: Why is the sky blue?\nAnswer: Sunlight is scattered by the molecules of the air, blue light most.",
    "Once upon a time there was a small robot who wanted to learn how to paint the sea at night.",
    "1, 2, 3, 5, 8, 13, 21 - each number is the sum of the two before it. Translate 'good morning' to German.",
]


class SmoothInt8Linear(nn.Module):
    """y = int8_linear(W * s)(x / s): same product as the fp32 Linear, outliers moved into the weights."""

    def __init__(self, linear: nn.Linear, act_absmax: torch.Tensor, alpha: float | None = None):
        super().__init__()
        alpha = _ALPHA if alpha is None else alpha
        w = linear.weight.detach().float()
        s = act_absmax.float().clamp(min=1e-5) ** alpha / w.abs().amax(0).clamp(min=1e-5) ** (1 - alpha)
        s = s.clamp(min=1e-5)
        scaled = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            scaled.weight.copy_(w * s)
            if linear.bias is not None:
                scaled.bias.copy_(linear.bias)
        self.q = int8_linear(scaled)
        self.register_buffer("inv_s", (1 / s).to(linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x * self.inv_s)


def quantize_decoder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, skip: nn.Module | None = None, only: str = "",
                     exclude: tuple[str, ...] = ()) -> int:
    """Replace every nn.Linear in `model` except `skip` (the LM head) in place; returns how many.
    `only`: quantize just the Linears whose qualified name contains this string (e.g. "mlp");
    `exclude`: keep fp32 the Linears whose name contains one of these."""
    names = {id(m): n for n, m in model.named_modules()}
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and child is not skip and only in names.get(id(child), "")
               and not any(e in names.get(id(child), "") for e in exclude)]
    absmax: dict[int, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple) -> None:
        x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
        key = id(module)
        absmax[key] = x if key not in absmax else torch.maximum(absmax[key], x)

    hooks = [child.register_forward_pre_hook(record) for _, _, child in targets]
    try:
        device = next(model.parameters()).device
        with torch.inference_mode():
            for text in _CALIBRATION:
                ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
                model(input_ids=ids, use_cache=False, logits_to_keep=1)  # the decoder's inputs are what matter
    finally:
        for h in hooks:
            h.remove()
    for parent, name, child in targets:
        stats = absmax.get(id(child))
        setattr(parent, name, SmoothInt8Linear(child, stats) if stats is not None else int8_linear(child))
    return len(targets)
