"""Rejection-sampling fine-tuning (LLaMA-2-Chat): `protege train rs --config rs.yaml`.

Per training prompt, sample `k` answers from the policy (temperature ~1; LLaMA-2 found 1.2-1.3 best
for its larger models), score them with the reward, keep the best (with `previous`, the best over
this and earlier rounds' samples, as LLaMA-2 did from RLHF-V3 to avoid forgetting), and fine-tune on
the kept answers with the SFT method (`train.sft`, LoRA by default).

Reported beside the model: the best-of-k reward curve against k (LLaMA-2's Figure 7), estimated
without bias from the k samples per prompt (the expected maximum of j draws without replacement),
with the analytic KL of best-of-j sampling, log j - (j - 1) / j; and, through the over-optimisation
watch, proxy, gold and KL to the start policy on held-out prompts before and after fine-tuning.
Samples are cached per chunk of prompts, so a killed run resumes without decoding them again.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from ..config import Sampling, sampling_field
from ..errors import StageError
from ..files import jsonl_rows
from ..manifest import StageRun
from .fit import pad_id, run_logger
from .rl import (OverOptimisationWatch, RolloutSettings, Rollout, RolloutCache, make_rewards, policy_eval, reference_off,
                 sample_rollouts, score_rollouts, split_prompts)
from .rewards import describe_reward
from .rollout_engines import ProtegeRollouts, make_rollout_engine
from .rl_losses import best_of_n_kl
from .settings import TrainSettings

__all__ = ["RSConfig", "run", "expected_best_of", "best_of_curve"]


class RSConfig(RolloutSettings):
    """Rejection sampling: rollouts as in RL, then supervised fine-tuning on the best answers, with SFT's optimizer
    defaults (TrainSettings: LoRA with dropout, 2e-4, cosine, warmup)."""

    out_dir: str = Field("runs/rs", description="samples, kept answers, the fine-tuned model, curves and manifest")
    k: int = Field(8, ge=1, description="answers sampled per prompt")
    sampling: Sampling = sampling_field("how the k answers are sampled (LLaMA-2: temperature 1.2-1.3 for its larger "
                                        "models)", max_new_tokens=128, temperature=1.0)
    previous: list[str] = Field(default_factory=list, description="earlier rounds' best.jsonl: each prompt keeps its best over all rounds")
    chunk: int = Field(8, ge=1, description="prompts sampled (and cached) together")
    epochs: int = Field(2, ge=1, description="passes over the kept answers")
    eval_every: int = Field(0, ge=0, description="SFT eval loss every N steps (0: at the end)")
    save_every: int = Field(50, ge=0, description="checkpoint every N optimizer steps")
    min_reward: float | None = Field(None, description="drop prompts whose best answer scores below this")


def expected_best_of(rewards: list[float], j: int) -> float:
    """E[max of j draws without replacement] from these k rewards: sum_i r_(i) C(i-1, j-1) / C(k, j)."""
    k = len(rewards)
    if not 1 <= j <= k:
        raise ValueError(f"best of {j} needs 1 <= j <= {k}")
    ranked = sorted(rewards)
    total = math.comb(k, j)
    return sum(r * math.comb(i, j - 1) for i, r in enumerate(ranked)) / total


def best_of_curve(groups: list[list[float]]) -> list[dict[str, float]]:
    """Mean over prompts of the expected best-of-j reward for j = 1..k, with the analytic KL."""
    k = min(len(g) for g in groups)
    return [{"k": j, "reward": sum(expected_best_of(g[:k], j) for g in groups) / len(groups),
             "median_reward": sorted(expected_best_of(g[:k], j) for g in groups)[len(groups) // 2],
             "kl_nats": best_of_n_kl(j)} for j in range(1, k + 1)]


def _previous_best(paths: list[str]) -> dict[str, dict[str, Any]]:
    best: dict[str, dict[str, Any]] = {}
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise StageError(f"rs: previous round's {path} does not exist")
        for n, rec in jsonl_rows(p):
            try:
                key, reward = rec["prompt_id"], float(rec["reward"])
            except (KeyError, TypeError, ValueError):
                raise StageError(f"{path}:{n}: not a best.jsonl record (needs prompt_id, reward, messages)") from None
            if key not in best or reward > float(best[key]["reward"]):
                best[key] = rec
    return best


def _figure(curve: list[dict[str, float]], out: Path) -> Path:
    from ..figures import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c["k"] for c in curve], [c["reward"] for c in curve], "o-", label="mean best-of-k reward")
    ax.plot([c["k"] for c in curve], [c["median_reward"] for c in curve], "s--", alpha=0.6, label="median")
    ax.set_xlabel("k (samples per prompt)")
    ax.set_ylabel("reward of the kept answer")
    tw = ax.twinx()
    tw.plot([c["k"] for c in curve], [c["kl_nats"] for c in curve], ":", color="gray", label="KL log k - (k-1)/k")
    tw.set_ylabel("KL of best-of-k to the policy (nats)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Rejection sampling: best-of-k")
    ax.grid(alpha=0.3)
    path = out / "best_of_k.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def run(config: RSConfig) -> dict[str, Any]:
    """Sample, keep the best, fine-tune, evaluate; returns summary counts (see the module docstring)."""
    from ..chat import ChatFormat
    from ..engine import Engine
    from ..models import load
    from ..precision import resolve_precision
    from .sft import SFTConfig
    from .sft import run as sft_run

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would sample the same answers into one folder
        raise StageError("rs: rejection sampling runs in one process (its sampling is not split over ranks); run "
                         "it without `accelerate launch`, or shard only its fine-tuning: `accelerate launch ... -m "
                         "protege.cli train sft --datasets=[OUT/best.jsonl]` on the kept answers")
    stage = StageRun("rs", config, config.out_dir)
    out = stage.out
    log = run_logger("rs", out, True)
    items, held = split_prompts(config, "rs")
    proxy, gold, gold_cfg = make_rewards(config, log)
    precision = resolve_precision(config.precision)
    log(f"sampling in {precision.name} ({precision.reason})")
    model, tok = load(config.model, dtype=precision.torch_name)
    chat = ChatFormat.from_tokenizer(tok, template=config.chat_template)
    engine = make_rollout_engine(config.rollout, model=model, tok=tok, chat=chat, spec=config.model,
                                 precision=precision.torch_name, out_dir=out, max_len=config.max_length,
                                 max_batch=config.engine_batch, seed=config.seed, merge=False)

    # ---- sample k per prompt (cached per chunk) ------------------------------------------------
    cache = RolloutCache(out / "rollouts")
    from tqdm.auto import tqdm

    samples: list[Rollout] = []
    t0, decoded = time.perf_counter(), 0
    chunks = [list(range(s, min(s + config.chunk, len(items)))) for s in range(0, len(items), config.chunk)]
    for c, idx in enumerate(tqdm(chunks, desc=f"rs: sampling {config.k} per prompt", unit="chunk")):
        got = cache.get(c)
        if got is None:
            got = sample_rollouts(engine, chat, items, idx, config.k, config.sampling, config.seed, c,
                                  config.max_prompt)
            for r, s in zip(got, score_rollouts(proxy, items, got)):
                r.reward = s
            cache.put(c, got)
            decoded += sum(len(r.answer_ids) for r in got)
        samples += got
    sample_seconds = time.perf_counter() - t0
    engine.close()  # vLLM's copy of the weights and its KV cache are not needed for the fine-tuning
    groups = [samples[i * config.k:(i + 1) * config.k] for i in range(len(items))]
    curve = best_of_curve([[r.reward for r in g] for g in groups])

    # ---- keep the best (over earlier rounds too) ------------------------------------------------
    earlier = _previous_best(config.previous)
    kept, from_earlier, dropped, empty = [], 0, 0, 0
    for item, group in zip(items, groups):
        said = [r for r in group if r.text.strip()]  # an answer with no text cannot be an SFT target
        old = earlier.get(item.id)
        if said:
            best = max(said, key=lambda r: (r.reward, -len(r.answer_ids)))  # ties: the shorter answer
            rec = {"id": f"rs-{item.id}", "prompt_id": item.id, "reward": best.reward,
                   "messages": item.messages + [{"role": "assistant", "content": best.text}],
                   "meta": {"k": config.k, "finish_reason": best.finish_reason,
                            "round_rewards": [r.reward for r in group]}}
        if old is not None and (not said or float(old["reward"]) > best.reward):
            rec, from_earlier = old, from_earlier + 1
        elif not said:
            empty += 1
            continue
        if config.min_reward is not None and float(rec["reward"]) < config.min_reward:
            dropped += 1
            continue
        kept.append(rec)
    if not kept:
        raise StageError(f"rs: no prompt's best answer reached min_reward={config.min_reward} ({empty} prompts "
                         f"had only empty answers)")
    (out / "best.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    (out / "best_of_k.json").write_text(json.dumps(curve, indent=2))
    figure = _figure(curve, out)
    log(f"{len(items)} prompts x {config.k} samples ({decoded} tokens decoded in {sample_seconds:.0f} s); best-of-1 "
        f"{curve[0]['reward']:.3f} -> best-of-{config.k} {curve[-1]['reward']:.3f} (KL {curve[-1]['kl_nats']:.2f} nats); "
        f"kept {len(kept)} ({from_earlier} from earlier rounds, {dropped} below min_reward, {empty} with only "
        f"empty answers)")

    # ---- fine-tune on the kept answers with SFT ---------------------------------------------------
    # Every training setting carries over, but where the model goes and what it is evaluated on.
    shared = {k: getattr(config, k) for k in TrainSettings.model_fields
              if k not in ("out_dir", "eval_dataset", "eval_fraction", "eval_max_examples")}
    sft_cfg = SFTConfig(**shared, datasets=[str(out / "best.jsonl")], out_dir=str(out / "sft"), eval_fraction=0.0)
    sft_summary = sft_run(sft_cfg)

    # ---- held-out proxy / gold / KL before and after ---------------------------------------------
    watch = OverOptimisationWatch(out, lambda path: None, log)
    adapter = out / "sft" / "adapter"
    pad = pad_id(tok)
    dev = next(model.parameters()).device
    evals = {}
    if held and adapter.exists():
        from peft import PeftModel

        from .policy import PolicyLogprobs

        policy = PeftModel.from_pretrained(model, str(adapter)).eval()
        scorer = PolicyLogprobs(policy, config.logits_chunk, config.score_temperature)  # KL of the sampled answers

        def logps(b: dict[str, torch.Tensor], ref: bool) -> torch.Tensor:
            args = (b["input_ids"], b["position_ids"], None, b["score_index"], b["score_target"])
            if ref:
                with reference_off(policy):
                    return scorer.token_logps(*args)
            return scorer.token_logps(*args)

        idx = list(range(len(held)))
        eng = ProtegeRollouts(Engine(policy, tok, chat, max_batch_size=config.engine_batch), merge=False)
        for step, label in ((0, "start"), (1, "after")):
            if step == 0:
                with reference_off(policy):
                    sums = policy_eval(eng, chat, held, idx, proxy, gold, lambda b, ref: logps(b, True), config,
                                       -1, pad, dev)
            else:
                sums = policy_eval(eng, chat, held, idx, proxy, gold, logps, config, -1, pad, dev)
            evals[label] = {k: v / len(held) for k, v in sums.items()}
            watch.record(step, evals[label]["proxy"], evals[label]["gold"], evals[label]["kl"])
        log(f"held-out ({len(held)} prompts): gold {evals['start']['gold']:.3f} -> {evals['after']['gold']:.3f}, "
            f"proxy {evals['start']['proxy']:.3f} -> {evals['after']['proxy']:.3f}, KL {evals['after']['kl']:.2f} nats")
    summary = {"prompts": len(items), "held_out": len(held), "k": config.k, "samples": len(samples),
               "decoded_tokens": decoded, "sample_seconds": round(sample_seconds, 1),
               "kept": len(kept), "kept_from_earlier_rounds": from_earlier, "dropped_below_min_reward": dropped,
               "dropped_all_empty": empty,
               "best_of_k": curve, "gold": describe_reward(gold_cfg), "eval": evals, "sft": sft_summary}
    stage.finish(inputs=[config.prompts, *config.previous],
                 outputs=[out / "best.jsonl", out / "best_of_k.json", figure, out / "sft"], counts=summary)
    return summary
