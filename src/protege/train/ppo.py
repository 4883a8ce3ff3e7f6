"""Proximal Policy Optimization with a KL penalty (InstructGPT, LLaMA-2-Chat): `protege train ppo`.

Per rollout batch (`rollout_prompts` prompts, one sampled answer each, from the policy's own weights
through protege's engine): the reward scores each answer; per answer token, the policy's and the
reference's (adapters off) log-probs and the value head's estimate are recorded; the reward is
`score` at the last token minus `beta` * KL per token (k1 or k3, `rl_losses.kl_shaped_rewards`);
GAE (gamma, lambda) gives advantages and returns; advantages are whitened over the batch. Then
`ppo_epochs` passes over the batch in `minibatches` minibatches, one optimizer step each: PPO's
clipped surrogate plus `vf_coef` * the clipped value loss. With `target_kl`, beta adapts after each
batch (Ziegler et al. 2019): beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * batch / horizon.

The value head is a linear layer on the policy's final hidden states (detached unless
`value_trunk_grad`: the value loss then also trains the LoRA adapters). It is saved beside the
adapter as `value_head.safetensors` and lives in every checkpoint.

It runs on `fit`: the plan is (batch, epoch, minibatch, piece) entries; the pieces of one minibatch, one per
accumulation step and rank (`grad_accum` x processes), make one optimizer step. Under DDP every rank decodes
the whole rollout batch (seeded: the same answers) and trains on its pieces of each minibatch. A batch's
rollouts *and* the statistics computed from them before its first update (old log-probs, values,
advantages, returns, the beta used) are cached on disk as one file, so a killed run resumes from its
checkpoint with exactly the PPO targets it had, and a rerun with the same seed reaches the same weights.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import torch
from pydantic import Field

from ..errors import StageError
from ..files import json_digest
from .policy import PolicyLogprobs
from .fit import LossOutput, start_run
from .model import save_model
from .rl import (RLSettings, Rollout, RolloutCache, eval_plan, load_policy, make_rewards, policy_eval, prompt_plan,
                 reference_off, rl_summary, rollout_batch, sample_rollouts, sampler_correction, save_policy,
                 score_rollouts, split_prompts, token_kl, watched_fit)
from .rewards import describe_reward
from .rollout_engines import sync_stats
from .rl_losses import clipped_policy_loss, clipped_value_loss, gae, kl_per_token, kl_shaped_rewards, whiten

__all__ = ["PPOConfig", "run", "adaptive_beta", "PPOModule"]


class PPOConfig(RLSettings):
    out_dir: str = Field("runs/ppo", description="where the adapter, value head, best-by-gold model, rollouts and metrics go")
    beta: float = Field(0.01, ge=0.0, description="KL penalty per token (LLaMA-2-Chat: 0.01 for 7B/13B, 0.005 for 34B/70B)")
    kl_estimator: str = Field("k1", pattern="^(k1|k3)$", description="per-token KL in the reward: k1 (logp - ref) or k3")
    target_kl: float | None = Field(None, gt=0.0, description="adaptive KL: nats per answer beta steers towards (None: fixed beta)")
    kl_horizon: int = Field(10000, ge=1, description="adaptive KL horizon (answers)")
    rollout_prompts: int = Field(16, ge=1, description="prompts (one answer each) per rollout batch")
    minibatches: int = Field(2, ge=1, description="minibatches per pass over a rollout batch (one optimizer step each)")
    ppo_epochs: int = Field(2, ge=1, description="passes over each rollout batch")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="GAE discount")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda")
    clip: float = Field(0.2, gt=0.0, description="policy ratio clip epsilon")
    value_clip: float | None = Field(0.2, gt=0.0, description="value clip around the old values (None: off)")
    vf_coef: float = Field(0.1, ge=0.0, description="weight of the value loss")
    whiten_advantages: bool = Field(True, description="advantages to mean 0, std 1 over the rollout batch")
    value_trunk_grad: bool = Field(False, description="the value loss also trains the policy's adapters")
    batches: int | None = Field(None, ge=1, description="rollout batches (default: epochs over the prompts)")


def adaptive_beta(beta: float, kl: float, target: float, n: int, horizon: int) -> float:
    """Ziegler et al.'s proportional controller: beta grows when KL runs above target, shrinks below."""
    error = max(-0.2, min(0.2, kl / target - 1.0))
    return beta * (1.0 + error * n / horizon)


class PPOModule(PolicyLogprobs):
    """Rollout batch -> (log p of each answer token (N,), value at each answer token's state (N,))."""

    def __init__(self, model: torch.nn.Module, value_head: torch.nn.Linear, logits_chunk: int, trunk_grad: bool,
                 temperature: float = 1.0):
        super().__init__(model, logits_chunk, temperature)
        self.value_head = value_head
        self.trunk_grad = trunk_grad

    def forward(self, input_ids, position_ids, score_index, score_target):  # type: ignore[override]
        h = self.scored_hidden(input_ids, position_ids, None, score_index)
        values = self.value_head(h if self.trunk_grad else h.detach()).squeeze(-1).float()
        return self.head_logps(h, score_target), values


def _padded(values: torch.Tensor, seq: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat per-token values (N,) of `n` answers (tokens in order within each) -> (n, T) and mask."""
    counts = torch.bincount(seq, minlength=n)
    T = int(counts.max()) if n else 0
    out = torch.zeros(n, max(T, 1), dtype=values.dtype, device=values.device)
    mask = torch.zeros_like(out)
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(len(seq), device=seq.device) - starts[seq]
    out[seq, col] = values
    mask[seq, col] = 1.0
    return out, mask


def run(config: PPOConfig, stop_after_steps: int | None = None) -> dict[str, Any]:
    """Train with PPO; returns summary counts (see the module docstring)."""
    from safetensors.torch import save_file

    if config.method != "lora":
        raise StageError("ppo: the reference is the policy with its adapters disabled; use method: lora")
    if config.rollout_prompts < config.minibatches:
        raise StageError(f"ppo: rollout_prompts ({config.rollout_prompts}) must be >= minibatches ({config.minibatches})")
    ctx = start_run("ppo", config, rollouts=True)
    accelerator, main, out_dir, log = ctx.accelerator, ctx.main, ctx.out_dir, ctx.log
    items, held = split_prompts(config, "ppo")
    proxy, gold, gold_cfg = make_rewards(config, log)

    model, tok, chat, pad, engine = load_policy(config, ctx)
    hidden = model.get_input_embeddings().weight.shape[1]
    torch.manual_seed(config.seed)
    # a submodule: trained, checkpointed and restored by fit (the engine never calls it)
    model.value_head = torch.nn.Linear(hidden, 1).to(accelerator.device)
    torch.nn.init.zeros_(model.value_head.weight)
    torch.nn.init.zeros_(model.value_head.bias)
    module = accelerator.prepare_model(PPOModule(model, model.value_head, config.logits_chunk, config.value_trunk_grad,
                                                config.score_temperature))

    n_batches = config.batches or max(1, -(-len(items) * config.epochs // config.rollout_prompts))
    batch_prompts = prompt_plan(len(items), config.rollout_prompts, n_batches, config.seed)
    per_mb = -(-config.rollout_prompts // config.minibatches)
    # One optimizer step is one minibatch (PPO's update count): `fit` takes grad_accum x processes micro-batches
    # per step, so each minibatch is split into that many pieces (a piece per accumulation step and rank).
    pieces = config.grad_accum * ctx.world

    def minibatch(part: int, n: int) -> range:
        """Answers (of n) in minibatch `part`."""
        return range(part * per_mb, min((part + 1) * per_mb, n))

    def piece(part: int, k: int, n: int) -> list[int]:
        """Answers (of n) of minibatch `part` in its k-th piece (sizes differ by at most one)."""
        answers = minibatch(part, n)
        return list(answers[k * len(answers) // pieces:(k + 1) * len(answers) // pieces])

    smallest = min(len(minibatch(m, config.rollout_prompts)) for m in range(config.minibatches))
    if pieces > smallest:
        raise StageError(f"ppo: grad_accum x processes = {pieces} pieces per minibatch, but a minibatch holds "
                         f"{smallest} answers; lower grad_accum or minibatches, or raise rollout_prompts")
    plan = [(b, e, m, k) for b in range(n_batches) for e in range(config.ppo_epochs) for m in range(config.minibatches)
            for k in range(pieces)]
    n_steps = len(plan) // pieces
    config_steps = n_steps if config.max_steps is None else config.max_steps
    if config.max_steps is not None and config.max_steps > n_steps:
        raise StageError(f"ppo: max_steps {config.max_steps} exceeds the plan's {n_steps} minibatch steps; "
                         "raise batches or epochs instead")
    cache = RolloutCache(out_dir / "rollouts")
    eval_batches = eval_plan(len(held), config.rollout_prompts)
    data_hash = json_digest([batch_prompts, [it.id for it in items], [it.id for it in held]], 16)
    log(f"{len(items)} training prompts, {len(held)} held out; {n_batches} rollout batches of {config.rollout_prompts} "
        f"x {config.ppo_epochs} epochs x {config.minibatches} minibatches = {config_steps} steps on {ctx.world} "
        f"process(es); reward "
        f"{describe_reward(config.reward)}, gold {describe_reward(gold_cfg)}, beta {config.beta}")
    stats = {"rollouts": 0, "reused_batches": 0, "rollout_tokens": 0, "rollout_seconds": 0.0}
    targets: dict[int, dict[str, Any]] = {}  # batch -> rollouts + PPO targets (in memory and on disk)

    def forward(m: Any, b: dict[str, torch.Tensor], reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        args = (b["input_ids"], b["position_ids"], b["score_index"], b["score_target"])
        if not reference:
            return m(*args)
        with torch.no_grad(), reference_off(model):
            return accelerator.unwrap_model(m)(*args)

    def batch_targets(m: Any, b: int) -> dict[str, Any]:
        """The rollouts of batch b and everything PPO fixes before its first update (cached)."""
        if b in targets:
            return targets[b]
        data = cache.load(f"targets-{b:06d}")
        if data is not None:
            stats["reused_batches"] += 1
        else:
            prev = targets.get(b - 1) or (cache.load(f"targets-{b - 1:06d}") if b > 0 else None)
            beta = config.beta
            if prev is not None and config.target_kl:
                beta = adaptive_beta(prev["beta"], prev["kl_mean"], config.target_kl, config.rollout_prompts,
                                     config.kl_horizon)
            t0 = time.perf_counter()
            ro = sample_rollouts(engine, chat, items, batch_prompts[b], 1, config.sampling, config.seed, b,
                                 config.max_prompt)
            for r, s in zip(ro, score_rollouts(proxy, items, ro)):
                r.reward = s
            stats["rollout_seconds"] += time.perf_counter() - t0
            stats["rollout_tokens"] += sum(len(r.answer_ids) for r in ro)
            batch = rollout_batch(ro, pad, accelerator.device)
            with torch.no_grad():
                lp, values = forward(m, batch)
                ref_lp, _ = forward(m, batch, reference=True)
            n, seq = len(ro), batch["score_seq"]
            kl_tok = kl_per_token(lp, ref_lp, config.kl_estimator)
            kl2, mask = _padded(kl_tok, seq, n)
            v2, _ = _padded(values, seq, n)
            scores = torch.tensor([r.reward for r in ro], device=accelerator.device)
            rewards = kl_shaped_rewards(scores, kl2, mask, beta)
            adv, ret = gae(rewards, v2, mask, config.gamma, config.lam)
            if config.whiten_advantages:
                adv = whiten(adv, mask)
            flat = mask.bool()
            # Rollouts from another engine (vLLM): the trainer's log-probs are PPO's old policy; each token's
            # term is also weighted by the truncated ratio of the trainer's to the sampler's probability.
            weights, mismatch = sampler_correction(lp, ro, config.rollout)
            data = {"rollouts": [asdict(r) for r in ro], "old_logp": lp.tolist(), "old_values": values.tolist(),
                    "is_weight": weights.tolist() if weights is not None else None, **mismatch,
                    "advantages": adv[flat].tolist(), "returns": ret[flat].tolist(), "beta": beta,
                    "kl_mean": float(token_kl(lp, ref_lp, seq, n).mean()), "score_mean": float(scores.mean())}
            if main:
                cache.store(f"targets-{b:06d}", data)
        targets.clear()  # keep only this batch (and its successor's lookup of it)
        targets[b] = data
        return data

    def train_loss(m: Any, mb: tuple[int, int, int, int]) -> LossOutput:
        b, epoch, part, k = mb
        data = batch_targets(m, b)
        ro = [Rollout(**r) for r in data["rollouts"]]
        stats["rollouts"] += len(ro) if part == 0 and epoch == 0 and k == 0 else 0
        # token offsets of each answer in the flat per-token lists
        starts, at = [], 0
        for r in ro:
            starts.append(at)
            at += len(r.answer_ids)
        pick = piece(part, k, len(ro))
        sub = [ro[i] for i in pick]
        tok_idx = [t for i in pick for t in range(starts[i], starts[i] + len(ro[i].answer_ids))]
        dev = accelerator.device
        take = lambda key: torch.tensor([data[key][t] for t in tok_idx], device=dev)  # noqa: E731
        batch = rollout_batch(sub, pad, dev)
        lp, values = forward(m, batch)
        ones = torch.ones_like(lp)
        adv = take("advantages") if data.get("is_weight") is None else take("advantages") * take("is_weight")
        pg, clip_frac = clipped_policy_loss(lp, take("old_logp"), adv, ones, config.clip)
        vf = clipped_value_loss(values, take("old_values"), take("returns"), ones, config.value_clip)
        n_tok = float(len(tok_idx))
        return LossOutput(pg + config.vf_coef * vf, n_tok,
                          {"policy_loss": pg.detach(), "value_loss": vf.detach(), "clip_frac": clip_frac * n_tok,
                           "reward": data["score_mean"] * n_tok, "kl": data["kl_mean"] * n_tok,
                           "beta": data["beta"] * n_tok,
                           **{k: data[k] * n_tok for k in ("logp_mismatch", "is_truncated") if k in data}})

    def eval_loss(m: Any, mb: tuple[int, list[int]]) -> LossOutput:
        index, prompt_idx = mb
        sums = policy_eval(engine, chat, held, prompt_idx, proxy, gold,
                           lambda b, ref: forward(m, b, ref)[0], config, index, pad, accelerator.device)
        return LossOutput(torch.zeros(()), len(prompt_idx), sums)


    def save_best(path: Any) -> None:
        if main:
            save_policy(model, tok, chat, path)
            save_file({k: v.detach().cpu().contiguous() for k, v in model.value_head.state_dict().items()},
                      str(path / "value_head.safetensors"))

    result, watch = watched_fit("ppo", config, model=model, module=module, accelerator=accelerator, out_dir=out_dir,
                                log=log, micro_batches=plan, loss_fn=train_loss, eval_fn=eval_loss,
                                tokens_of=lambda mb: len(piece(mb[2], mb[3], config.rollout_prompts)), data_hash=data_hash, unit="answers", eval_batches=eval_batches,
                                save_best=save_best, stop_after_steps=stop_after_steps, engine=engine)
    if result.stopped:
        return {"stopped_at_step": stop_after_steps, "steps": result.steps, **stats}
    figure = watch.figure() if main else None
    summary = rl_summary(result, watch, {**stats, **sync_stats(engine)}, prompts=len(items), held_out=len(held),
                         rollout_batches=n_batches)
    accelerator.wait_for_everyone()
    if main:
        value_head = model.value_head
        del model.value_head  # not part of the policy's adapter or merged model
        outputs = save_model(config, model, tok, chat, out_dir)
        save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()},
                  str(out_dir / "adapter" / "value_head.safetensors"))
        outputs += [out_dir / "metrics.jsonl", watch.path] + ([figure] if figure else [])
        ctx.stage.finish(inputs=[config.prompts, *([config.eval_prompts] if config.eval_prompts else [])],
                         outputs=outputs, counts=summary)
    return summary
