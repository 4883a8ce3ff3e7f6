"""Group Relative Policy Optimization: `protege train grpo --config grpo.yaml`.

Per step, each prompt of the micro-batch gets `group_size` sampled answers from the policy's own
weights (`rl.sample_rollouts`); the reward scores them; each answer's advantage is its reward
relative to its group (`rl_losses.group_advantages`: GRPO's mean/std, or RLOO's leave-one-out
mean), so no value head is needed (Shao et al. 2024). The loss is PPO's clipped surrogate with one
policy update per batch of rollouts (the ratio is 1, its gradient -A * grad log p), averaged over
each answer's tokens and then over answers (GRPO's normalisation), plus `beta` * per-token KL to
the reference (k3 by default; `beta` 0, TRL's default, skips the reference forward in training).
Rollouts decoded by vLLM (`rollout.backend`) carry vLLM's own log-probs: each token's term is weighted by
the truncated ratio of the trainer's probability to vLLM's (`rl.sampler_correction`).

It runs on `fit`, the loop SFT, RM and DPO share: the micro-batch plan is a list of prompt groups
fixed by the seed; a micro-batch's rollouts are cached on disk, so a killed run resumes from its
checkpoint without decoding the rollouts it already had, and reaches the same weights. Held-out
evaluations (every `eval_every` steps, before the first step and at the end) feed the
over-optimisation watch (`rl.OverOptimisationWatch`): proxy, gold, KL, best model by gold.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import Field

from ..errors import StageError
from ..files import json_digest
from .policy import PolicyLogprobs
from .fit import LossOutput, start_run
from .model import save_model
from .rl import (RLSettings, RolloutCache, eval_plan, load_policy, make_rewards, policy_eval, prompt_plan,
                 reference_off, rl_summary, rollout_batch, sample_rollouts, sampler_correction, save_policy, score_rollouts,
                 split_prompts, watched_fit)
from .rewards import describe_reward
from .rollout_engines import sync_stats
from .rl_losses import clipped_policy_loss, group_advantages, kl_per_token

__all__ = ["GRPOConfig", "run", "grpo_objective"]


class GRPOConfig(RLSettings):
    out_dir: str = Field("runs/grpo", description="where the adapter, best-by-gold model, rollouts, metrics and manifest go")
    group_size: int = Field(4, ge=2, description="answers sampled per prompt (G)")
    batch_size: int = Field(4, ge=1, description="prompts per micro-batch (each with group_size answers)")
    baseline: str = Field("grpo", pattern="^(grpo|rloo)$", description="group mean/std (grpo) or leave-one-out mean (rloo)")
    scale_rewards: bool = Field(True, description="grpo: divide by the group's reward std (False: Dr. GRPO)")
    clip: float = Field(0.2, gt=0.0, description="PPO ratio clip epsilon")


class _RolloutLogprobs(PolicyLogprobs):
    """The policy module DDP wraps: a rollout batch -> log p of each answer token (N,)."""

    def forward(self, input_ids, position_ids, score_index, score_target):  # type: ignore[override]
        return self.token_logps(input_ids, position_ids, None, score_index, score_target)


def grpo_objective(logp: torch.Tensor, ref_logp: torch.Tensor | None, seq: torch.Tensor, advantages: torch.Tensor,
                   clip: float, beta: float, estimator: str = "k3",
                   is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss summed over answers, per-answer KL (n,)) from per-token tensors (N,) and per-answer advantages (n,).

    Each answer's token terms are averaged over its own length, then summed over answers: `fit`
    divides by the number of answers in the step. `is_weights` (N,): each token's policy-gradient term is
    weighted by it (the truncated importance weight of rollouts another engine sampled).
    """
    n = advantages.shape[0]
    lengths = torch.zeros(n, device=logp.device).index_add_(0, seq, torch.ones_like(logp))
    weight = 1.0 / lengths.clamp(min=1)[seq]  # (N,): 1 / |answer| of each token's answer
    ones = torch.ones_like(logp)
    coef = advantages[seq] * weight if is_weights is None else advantages[seq] * weight * is_weights
    loss, _ = clipped_policy_loss(logp, logp.detach(), coef, ones, clip)
    kl = torch.zeros(n, device=logp.device)
    if ref_logp is not None:
        per_tok = kl_per_token(logp, ref_logp, estimator)
        kl = kl.index_add(0, seq, per_tok.detach())
        if beta:
            loss = loss + beta * (per_tok * weight).sum()
    return loss, kl


def run(config: GRPOConfig, stop_after_steps: int | None = None) -> dict[str, Any]:
    """Train with GRPO; returns summary counts (see the module docstring)."""
    if config.method != "lora":
        raise StageError("grpo: the reference is the policy with its adapters disabled; use method: lora")
    ctx = start_run("grpo", config, rollouts=True)
    accelerator, main, out_dir, log = ctx.accelerator, ctx.main, ctx.out_dir, ctx.log
    items, held = split_prompts(config, "grpo")
    proxy, gold, gold_cfg = make_rewards(config, log)

    model, tok, chat, pad, engine = load_policy(config, ctx)
    module = accelerator.prepare_model(_RolloutLogprobs(model, config.logits_chunk, config.score_temperature))

    per_step = config.grad_accum * ctx.world
    steps = config.max_steps or max(1, -(-len(items) * config.epochs // (config.batch_size * per_step)))
    plan = prompt_plan(len(items), config.batch_size, steps * per_step, config.seed)
    micro_batches = list(enumerate(plan))
    eval_batches = eval_plan(len(held), config.batch_size * config.group_size)
    cache = RolloutCache(out_dir / "rollouts")
    data_hash = json_digest([plan, [it.id for it in items], [it.id for it in held]], 16)
    log(f"{len(items)} training prompts, {len(held)} held out; {steps} steps of {config.batch_size * per_step} "
        f"prompts x {config.group_size} answers on {ctx.world} process(es); reward {describe_reward(config.reward)}, "
        f"gold {describe_reward(gold_cfg)}")
    stats = {"rollouts": 0, "reused": 0, "rollout_tokens": 0, "rollout_seconds": 0.0}

    def logps(m: Any, batch: dict[str, torch.Tensor], reference: bool) -> torch.Tensor:
        args = (batch["input_ids"], batch["position_ids"], batch["score_index"], batch["score_target"])
        if not reference:
            return m(*args)
        with torch.no_grad(), reference_off(model):
            return accelerator.unwrap_model(m)(*args)

    def train_loss(m: Any, mb: tuple[int, list[int]]) -> LossOutput:
        index, prompt_idx = mb
        rollouts = cache.get(index)
        if rollouts is None:
            t0 = time.perf_counter()
            rollouts = sample_rollouts(engine, chat, items, prompt_idx, config.group_size, config.sampling,
                                       config.seed, index, config.max_prompt)
            for r, s in zip(rollouts, score_rollouts(proxy, items, rollouts)):
                r.reward = s
            stats["rollout_seconds"] += time.perf_counter() - t0
            stats["rollout_tokens"] += sum(len(r.answer_ids) for r in rollouts)
            if main:
                cache.put(index, rollouts)
        else:
            stats["reused"] += len(rollouts)
        stats["rollouts"] += len(rollouts)
        rewards = torch.tensor([r.reward for r in rollouts], device=accelerator.device)
        adv = group_advantages(rewards, config.group_size, config.baseline, config.scale_rewards)
        n = len(rollouts)
        keep = list(range(n))
        if config.beta == 0:
            # An answer with advantage 0 (every answer of a group that all scored the same) adds exactly 0 to
            # the loss and its gradient when there is no KL term: skip its forward and backward. The sum is
            # unchanged and the normaliser still counts it, so the update is the same, minus the wasted work.
            keep = [i for i in range(n) if adv[i] != 0] or [0]
        sub = [rollouts[i] for i in keep]
        batch = rollout_batch(sub, pad, accelerator.device)
        lp = logps(m, batch, reference=False)
        ref = logps(m, batch, reference=True) if config.beta > 0 else None
        weights, mismatch = sampler_correction(lp, sub, config.rollout)
        loss, kl = grpo_objective(lp, ref, batch["score_seq"], adv[keep], config.clip, config.beta,
                                  config.kl_estimator, weights)
        solved = (rewards.reshape(-1, config.group_size).std(1) == 0).float().sum() * config.group_size
        sums = {"reward": rewards.sum(), "scored_answers": float(len(keep)), "flat_groups": solved,
                **{k: v * n for k, v in mismatch.items()}}  # per-token means, weighted like every answer metric
        if ref is not None:  # beta 0 runs no reference forward in training: KL is measured at the evals only
            sums["kl"] = kl.sum()
        return LossOutput(loss, n, sums)

    def eval_loss(m: Any, mb: tuple[int, list[int]]) -> LossOutput:
        index, prompt_idx = mb
        sums = policy_eval(engine, chat, held, prompt_idx, proxy, gold, lambda b, ref: logps(m, b, ref), config,
                           index, pad, accelerator.device)
        return LossOutput(torch.zeros(()), len(prompt_idx), sums)


    def save_best(path: Any) -> None:
        if main:
            save_policy(model, tok, chat, path)

    result, watch = watched_fit("grpo", config, model=model, module=module, accelerator=accelerator, out_dir=out_dir,
                                log=log, micro_batches=micro_batches, loss_fn=train_loss, eval_fn=eval_loss,
                                tokens_of=lambda mb: len(mb[1]) * config.group_size, data_hash=data_hash,
                                unit="answers", eval_batches=eval_batches, save_best=save_best,
                                stop_after_steps=stop_after_steps, engine=engine)
    if result.stopped:
        return {"stopped_at_step": stop_after_steps, "steps": result.steps, **stats}
    figure = watch.figure() if main else None
    summary = rl_summary(result, watch, {**stats, **sync_stats(engine)}, prompts=len(items), held_out=len(held))
    accelerator.wait_for_everyone()
    if main:
        outputs = save_model(config, model, tok, chat, out_dir)
        outputs += [out_dir / "metrics.jsonl", watch.path] + ([figure] if figure else [])
        ctx.stage.finish(inputs=[config.prompts, *([config.eval_prompts] if config.eval_prompts else [])],
                         outputs=outputs, counts=summary)
        log(f"done: {result.steps} steps; held-out gold {watch.history[0]['gold'] if watch.history else float('nan'):.3f}"
            f" -> {watch.history[-1]['gold'] if watch.history else float('nan'):.3f}; outputs in {out_dir}")
    return summary

