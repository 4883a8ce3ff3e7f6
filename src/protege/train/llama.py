"""LLaMA-architecture models named by size, their parameter counts and FLOPs per token.

The architecture is transformers' `LlamaForCausalLM` (RMSNorm, SwiGLU, RoPE, grouped-query attention),
built from a `LlamaConfig`, so what pretraining writes is a model every HF tool, PEFT, llama.cpp's
converter and protege's own stages already load.

Shapes follow nanochat's one knob: `depth` layers of width `depth * aspect_ratio`, heads of `head_dim`,
`gqa_group` query heads per key/value head (LLaMA-2 70B: 8), SwiGLU hidden size 8/3 of the width rounded
up to a multiple of 32 (LLaMA rounds to 256, too coarse for models this small). A size given as a
parameter count ("3M") picks the depth x width shape (width a multiple of the head size (at least 16), within 1.5x of depth *
aspect_ratio) whose non-embedding count is nearest: a finer ladder than depth alone, of alike shapes.

Counting: N is the *non-embedding* parameter count (Kaplan et al.; with a 4k vocabulary the embedding
of a tiny model outweighs its body, and its lookup costs no FLOPs). Training FLOPs per token are
6 * (N + width * vocab) for the matmuls, the LM head included whether tied or not, plus attention's
12 * layers * heads * head_dim * seq_len (PaLM's convention, as nanochat counts, ignoring the causal mask).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

__all__ = ["LlamaShape", "shape_for", "parse_count", "SizeError"]


class SizeError(UserError, ValueError):
    """A model size that names no buildable shape."""


@dataclass(frozen=True)
class LlamaShape:
    depth: int
    width: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tie: bool = False

    @property
    def non_embedding(self) -> int:
        """N: attention + MLP + norm parameters (not the embedding, not the LM head)."""
        d, q, kv = self.width, self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = d * q + 2 * d * kv + q * d + 3 * d * self.ffn + 2 * d
        return self.depth * per_layer + d

    @property
    def total(self) -> int:
        return self.non_embedding + self.vocab * self.width * (1 if self.tie else 2)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): see the module docstring."""
        return 6.0 * (self.non_embedding + self.width * self.vocab) + 12.0 * self.depth * self.heads * self.head_dim * seq_len

    def config(self, max_length: int, rope_theta: float = 10000.0, **extra: Any) -> Any:
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.width, intermediate_size=self.ffn,
                           num_hidden_layers=self.depth, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
                           max_position_embeddings=max_length, rope_theta=rope_theta, rms_norm_eps=1e-5,
                           tie_word_embeddings=self.tie, hidden_act="silu", initializer_range=0.02,
                           attention_bias=False, mlp_bias=False, **extra)

    def describe(self) -> str:
        return (f"{fmt_count(self.non_embedding)} non-embedding params ({fmt_count(self.total)} total): "
                f"{self.depth} layer{'s' if self.depth > 1 else ''} x {self.width} wide, {self.heads} heads ({self.kv_heads} kv) of {self.head_dim}, "
                f"SwiGLU {self.ffn}, vocab {self.vocab}{', tied' if self.tie else ''}")


def fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def parse_count(text: str) -> float:
    """'3M' -> 3e6, '250k' -> 2.5e5, '1.5B' -> 1.5e9, '12000' -> 12000."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMbB]?)\s*", str(text))
    if not m:
        raise SizeError(f"model_size {text!r}: expected a parameter count such as 500K, 3M or 1.5B")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()]


def shape_for(vocab: int, *, depth: int | None = None, model_size: str | None = None, aspect_ratio: int = 64,
              head_dim: int = 64, gqa_group: int = 2, tie: bool = False) -> LlamaShape:
    """The shape of `depth` layers, or of the depth whose non-embedding count is nearest `model_size`."""

    def at(L: int, width: int | None = None) -> LlamaShape:
        width = width or L * aspect_ratio
        heads = max(1, width // head_dim)
        while width % heads:  # transformers requires the width to split evenly over the heads
            heads -= 1
        kv = max(1, heads // gqa_group)
        while heads % kv:
            kv -= 1
        ffn = 32 * math.ceil(8 * width / 3 / 32)
        return LlamaShape(L, width, heads, kv, min(head_dim, width), ffn, vocab, tie)

    if depth is not None:
        if depth < 1:
            raise SizeError(f"depth must be >= 1 (got {depth})")
        return at(depth)
    if model_size is None:
        raise SizeError("give model_size (a parameter count such as 3M) or depth")
    target = parse_count(model_size)
    # Depth and width both free, width in steps of 16 and within 1.5x of depth * aspect_ratio: a ladder of sizes
    # much finer than depth alone gives, whose shapes stay alike (a 5-layer, 32-wide model is not a smaller
    # 2-layer, 64-wide one: it trains worse, and a size sweep would measure the shape instead of the size).
    step = max(16, head_dim)  # whole heads: width = heads x head_dim
    shapes = [at(L, w) for L in range(1, 129)
              for w in range(step * max(1, math.ceil(L * aspect_ratio / 1.5 / step)), int(L * aspect_ratio * 1.5) + 1, step)]
    return min(shapes, key=lambda s: (round(abs(math.log(s.non_embedding / target)), 2),
                                      abs(math.log(s.width / s.depth / aspect_ratio))))
