"""The policy as a module that scores tokens: packed batch -> log-probs of the scored tokens, through the
chunked LM head. DPO (sequence sums), RS (KL of samples), GRPO and PPO (per-token) all score with it; RL
scores at the temperature it sampled at."""

from __future__ import annotations

from typing import Any

import torch

from ..lm_head import embed_inputs, head_rows
from .logprobs import token_logprobs
from .model import require_head_parts
from .pair_data import additive_mask

__all__ = ["PolicyLogprobs", "batch_args"]


class PolicyLogprobs(torch.nn.Module):
    """Packed batch -> summed log-probs of each sequence's scored tokens (n_seqs,); DDP wraps this."""

    def __init__(self, model: torch.nn.Module, logits_chunk: int = 256, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self._parts = require_head_parts(model, "dpo")  # a plain object: not registered twice
        self.logits_chunk = logits_chunk
        # RL scores its rollouts under the distribution they were sampled from (logits / T, as TRL does):
        # at T != 1 the temperature-1 log-probs would make every policy-gradient step off-policy.
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 to score rollouts (got {temperature})")
        if temperature != 1.0 and self._parts.softcap:
            raise ValueError("rollout temperature != 1 with a soft-capped LM head (final_logit_softcapping) is not "
                             "supported: use temperature 1.0")
        self.temperature = temperature

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                score_index: torch.Tensor, score_target: torch.Tensor, score_seq: torch.Tensor,
                n_seqs: int) -> torch.Tensor:
        """Batch from `collate_pairs` -> sum of log-probs of each sequence's scored tokens (n_seqs,)."""
        lp = self.token_logps(input_ids, position_ids, attention_mask, score_index, score_target)
        return lp.new_zeros(n_seqs).index_add(0, score_seq, lp)

    def token_logps(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    score_index: torch.Tensor, score_target: torch.Tensor) -> torch.Tensor:
        """log p of each scored token (N,): what per-token losses (PPO, GRPO) and their KL need."""
        return self.head_logps(self.scored_hidden(input_ids, position_ids, attention_mask, score_index), score_target)

    def scored_hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      score_index: torch.Tensor) -> torch.Tensor:
        """Final hidden states (N, H) of the positions that predict the scored tokens (PPO's value head reads them)."""
        parts = self._parts
        emb = embed_inputs(self.model, input_ids)  # None: the decoder embeds (no trainable-token rows)
        hidden = parts.decoder(input_ids=None if emb is not None else input_ids, inputs_embeds=emb,
                               position_ids=position_ids,
                               attention_mask=additive_mask(attention_mask, self._dtype()),
                               use_cache=False).last_hidden_state  # (B, T, H)
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, score_index)  # (N_scored, H)

    def head_logps(self, hidden: torch.Tensor, score_target: torch.Tensor) -> torch.Tensor:
        weight, override = head_rows(self._parts.head)
        if self.temperature != 1.0:  # logits are linear in the hidden state (no softcap, checked above)
            hidden = hidden / self.temperature
        return token_logprobs(hidden, weight, score_target, self._parts.softcap, self.logits_chunk, override)

    def _dtype(self) -> torch.dtype:
        return head_rows(self._parts.head)[0].dtype


def batch_args(b: dict[str, Any], n_seqs: int) -> tuple:
    """The positional arguments of `PolicyLogprobs` from a `collate_pairs` batch (already on the device)."""
    return (b["input_ids"], b["position_ids"], b["attention_mask"], b["score_index"], b["score_target"],
            b["score_seq"], n_seqs)
