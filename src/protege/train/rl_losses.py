"""Reinforcement-learning pieces as pure functions of tensors (no model inside).

Each takes per-token or per-sequence quantities, as `losses.dpo_loss` does, so PPO, GRPO and
rejection sampling share them and each has hand-computed tests:

- `kl_per_token`: the per-token KL estimate between the policy and the reference from the
  log-probs of the *sampled* tokens (Schulman's k1 = logp - ref, unbiased, can be negative;
  k3 = exp(ref - logp) - (ref - logp) - 1, non-negative, lower variance; TRL's GRPO uses k3).
- `kl_shaped_rewards`: PPO's per-token reward, `-beta * kl` everywhere and the sequence score
  added at the last answer token (InstructGPT, LLaMA-2-Chat).
- `gae`: generalised advantage estimation over one answer (gamma, lambda), right to left.
- `whiten`: advantages to mean 0, std 1 over the valid tokens of a batch.
- `clipped_policy_loss`: PPO's clipped surrogate, summed over valid tokens.
- `clipped_value_loss`: the value head's squared error, clipped around the old values.
- `group_advantages`: GRPO's (reward - group mean) / group std, and RLOO's leave-one-out baseline.
- `best_of_n_kl`: the analytic KL of best-of-n sampling to the sampling policy, log n - (n - 1) / n.

Shapes: per-token tensors are (B, T) with a float `mask` (1 on answer tokens, 0 on padding).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = ["kl_per_token", "kl_shaped_rewards", "gae", "whiten", "clipped_policy_loss", "clipped_value_loss",
           "group_advantages", "best_of_n_kl", "masked_mean", "truncated_is_weights"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: Literal["k1", "k3"] = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) at the sampled tokens (same shape as `logp`)."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        d = ref_logp - logp
        return torch.exp(d) - d - 1.0
    raise ValueError(f"KL estimator must be k1 or k3, not {estimator!r}")


def kl_shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """(B, T) per-token rewards: -beta * kl on every answer token, plus the sequence score (B,) on its last one."""
    rewards = -beta * kl * mask
    last = (mask.cumsum(-1) * mask).argmax(-1)  # index of each row's last valid token
    rows = torch.arange(mask.shape[0], device=mask.device)
    has = mask.sum(-1) > 0
    rewards[rows[has], last[has]] += scores[has].to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (B, T). The value after an answer's last token is 0 (the episode ends).

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  returns = A + V.
    Padding (mask 0) contributes nothing and carries nothing across.
    """
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_adv = torch.where(m > 0, a, next_adv)
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """x normalised to unit variance (and mean 0 unless `shift_mean` is False) over the valid positions."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(PPO clipped surrogate summed over valid tokens, fraction of valid tokens where the clip was active).

    loss_t = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A),  ratio = exp(logp - old_logp).
    A sum, not a mean: `fit` divides by the step's token count, so accumulation and ranks agree.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantages
    loss = -torch.minimum(unclipped, clipped)
    clip_frac = ((clipped < unclipped).float() * mask).sum() / mask.sum().clamp(min=1)
    return (loss * mask).sum(), clip_frac.detach()


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float | None = 0.2) -> torch.Tensor:
    """0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2) summed over valid tokens (no clip when `clip` is None)."""
    err = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        err = torch.maximum(err, (clipped - returns) ** 2)
    return 0.5 * (err * mask).sum()


def group_advantages(rewards: torch.Tensor, group_size: int, baseline: Literal["grpo", "rloo"] = "grpo",
                     scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Per-sample advantages (B,) for B = prompts x group_size samples laid out prompt by prompt.

    grpo: (r - mean of its group) / (std of its group + eps) (DeepSeekMath; `scale=False` keeps the
    raw difference, Dr. GRPO's fix for the std's bias towards easy and hard prompts);
    rloo: r - mean of the *other* samples of its group (REINFORCE leave-one-out, unbiased).
    A group whose samples all got the same reward gets advantage 0: nothing to learn from it.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.reshape(-1, group_size).to(torch.float32)
    if baseline == "rloo":
        if group_size < 2:
            raise ValueError("rloo needs at least 2 samples per prompt")
        adv = r - (r.sum(1, keepdim=True) - r) / (group_size - 1)
    elif baseline == "grpo":
        adv = r - r.mean(1, keepdim=True)
        if scale:
            std = r.std(1, keepdim=True, unbiased=group_size > 1) if group_size > 1 else torch.zeros_like(r[:, :1])
            adv = adv / (std + eps)
    else:
        raise ValueError(f"baseline must be grpo or rloo, not {baseline!r}")
    return adv.reshape(-1)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n nats (Stiennon et al. 2020; exact for a continuous reward)."""
    if n < 1:
        raise ValueError("n must be >= 1")
    return math.log(n) - (n - 1) / n


def truncated_is_weights(logp: torch.Tensor, sample_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-token weights min(p_trainer / p_sampler, cap) (no gradient), NaN sampler log-probs giving weight 1.

    A fast inference engine (vLLM) samples from slightly different probabilities than the trainer computes
    (other kernels, precision, batch shapes), so its rollouts are a little off-policy. Weighting each token's
    policy-gradient term by the ratio, truncated at `cap` to bound the variance, corrects for it (truncated
    importance sampling, Yao et al. 2025; TRL's `vllm_importance_sampling_correction`)."""
    ratio = torch.exp(logp.detach() - sample_logp).clamp(max=cap)
    return torch.where(torch.isnan(sample_logp), torch.ones_like(ratio), ratio)
