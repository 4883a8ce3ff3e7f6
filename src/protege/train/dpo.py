"""Direct Preference Optimization: `protege train dpo --config dpo.yaml`.

The policy learns from preference pairs without a reward model (Rafailov et al. 2023):
`dpo_loss` on the summed log-probs of each answer under the policy and the reference.

- Reference: the policy with its LoRA adapters disabled (no second copy in memory); for full
  fine-tuning a frozen copy made before training. Its log-probs are computed once, before
  the first step, and cached on disk keyed by model, template and tokenised data, so a resumed
  or repeated run (another beta, another seed) never recomputes them, and a run killed while
  computing them resumes from the pairs already done.
- Only answer tokens reach the LM head (`sequence_logprobs`, chunked, recomputed in backward);
  each micro-batch's 2B sequences are packed into rows without cross-attention.
- Logged per step: loss, implicit rewards of chosen and rejected, reward accuracy and margin,
  and the drift of the chosen answer's log-prob from the reference (it often *falls* while
  the margin grows: DPO can push both answers down).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import Field

from ..files import json_digest, tolerant_jsonl
from .fit import LossOutput, fit, pad_id, start_run
from .losses import dpo_loss
from .model import load_base, prepare_model, save_model
from .policy import PolicyLogprobs, batch_args
from .pair_data import PairExample, can_share_prompt, collate_pairs, load_pair_sets, pairs_hash, plan_pair_batches
from .settings import PreferenceSettings, fingerprint
from .sharding import gather_trained, prepare_module

__all__ = ["DPOConfig", "PolicyLogprobs", "run", "reference_logprobs", "read_reference_cache"]


class DPOConfig(PreferenceSettings):
    out_dir: str = Field("runs/dpo", description="where the adapter/model, checkpoints, metrics and manifest go")
    beta: float = Field(0.1, gt=0.0, description="DPO beta: strength of the implicit KL to the reference")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="conservative DPO: probability that a label is flipped")
    learning_rate: float = Field(5e-5, gt=0.0, description="peak learning rate")
    reference_cache: str | None = Field(None, description="folder for cached reference log-probs (default: PROTEGE_HOME/reference_logps)")
    share_prompt: bool = Field(True, description="encode each pair's prompt once for both answers (4-D mask; off automatically past a sliding window)")


def _model_key(spec: str) -> str:
    """Identity of the model weights: the resolved path, with each weight file's size and mtime."""
    from ..models import resolve

    path = Path(resolve(spec))
    files = sorted(p for p in path.glob("*") if p.suffix in (".safetensors", ".bin", ".gguf", ".json")) if path.is_dir() else [path]
    return json.dumps([str(path.resolve()) if path.exists() else str(path),
                       [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files if p.exists()]])


def _to(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def read_reference_cache(cache: Path) -> dict[str, tuple[float, float]]:
    """pair id -> (chosen, rejected) reference log-probs from a cache file (missing file: empty)."""
    done: dict[str, tuple[float, float]] = {}
    for row in tolerant_jsonl(cache):
        try:
            done[row["id"]] = (float(row["chosen"]), float(row["rejected"]))
        except (KeyError, TypeError, ValueError):
            continue  # a line cut by a kill: that pair is recomputed
    return done


@torch.no_grad()
def reference_logprobs(ref: PolicyLogprobs, pairs: list[PairExample], cache: Path, pad: int, max_length: int,
                       batch_size: int, device: torch.device | str, log: Callable[[str], None], share_prompt: bool = False) -> dict[str, tuple[float, float]]:
    """pair id -> (reference log-prob of chosen, of rejected), computed once and appended to `cache` as JSONL.

    Lines already in the cache are reused, so a killed computation resumes where it stopped.
    """
    done = read_reference_cache(cache)
    todo = [p for p in pairs if p.id not in done]
    if not todo:
        return done
    log(f"reference log-probs: {len(done)} cached, computing {len(todo)} -> {cache}")
    from tqdm.auto import tqdm

    cache.parent.mkdir(parents=True, exist_ok=True)
    was = ref.training
    ref.eval()
    with cache.open("a", encoding="utf-8") as fh, tqdm(total=len(todo), desc="reference", unit="pair") as bar:
        for b in range(0, len(todo), batch_size):
            chunk = todo[b:b + batch_size]
            batch = _to(collate_pairs(chunk, pad, max_length, share_prompt), device)
            sums = ref(*batch_args(batch, 2 * len(chunk)))
            for i, p in enumerate(chunk):
                done[p.id] = (float(sums[2 * i]), float(sums[2 * i + 1]))
                fh.write(json.dumps({"id": p.id, "chosen": done[p.id][0], "rejected": done[p.id][1]}) + "\n")
            fh.flush()
            bar.update(len(chunk))
    ref.train(was)
    return done


def run(config: DPOConfig, stop_after_steps: int | None = None) -> dict[str, Any]:
    """Compute (or reuse) reference log-probs, then train with DPO through `fit`; returns summary counts."""
    from ..chat import ChatFormat
    from ..models import protege_home

    ctx = start_run("dpo", config)
    accelerator, main, world, out_dir, log = ctx.accelerator, ctx.main, ctx.world, ctx.out_dir, ctx.log

    model, tok = load_base(config, ctx.precision, accelerator.device)
    chat = ChatFormat.from_tokenizer(tok, template=config.chat_template)
    pad = pad_id(tok)
    train, held, stats, eval_stats = load_pair_sets(config, chat, "dpo")
    plan = plan_pair_batches(len(train), config.batch_size, config.epochs, config.seed)
    data_hash = pairs_hash(train) + pairs_hash(held)

    # ---- reference log-probs (before any training; main process computes, all read) --------
    frozen = copy.deepcopy(model) if config.method == "full" else None
    model = prepare_model(config, model, chat).to(accelerator.device)
    # The reference log-probs depend on the precision they are computed in (as the policy's must match them).
    key = json_digest([_model_key(config.model), chat.template, config.max_length, data_hash, *ctx.precision.cache_tag,
                       *([] if config.quantization == "none" else [config.quantization])], 20)
    cache = Path(config.reference_cache or protege_home() / "reference_logps") / f"{key}.jsonl"
    share = can_share_prompt(model, config)
    if main:
        if frozen is not None:
            ref_module, reference_mode = PolicyLogprobs(frozen.to(accelerator.device), config.logits_chunk), torch.no_grad()
        else:  # LoRA: the reference is the base model, i.e. the policy with its adapters switched off
            ref_module, reference_mode = PolicyLogprobs(model, config.logits_chunk), model.disable_adapter()
        with reference_mode, accelerator.autocast():  # the policy's precision, so KL is 0 at step 0
            reference_logprobs(ref_module, train + held, cache, pad, config.max_length, config.batch_size,
                               accelerator.device, log, share)
    accelerator.wait_for_everyone()
    ref = read_reference_cache(cache)
    del frozen

    model.train()
    log(f"{stats.pairs} pairs ({stats.truncated} truncated, skipped: {stats.skipped or 'none'}), {stats.tokens} tokens "
        f"({stats.scored_tokens} scored); {len(plan)} micro-batches -> "
        f"{ctx.steps(config, len(plan))} steps on {world} process(es); "
        f"eval on {len(held)} pairs; reference cache {cache}")
    module = prepare_module(accelerator, PolicyLogprobs(model, config.logits_chunk))

    def loss_fn(m: torch.nn.Module, pairs: list[PairExample]) -> LossOutput:
        b = _to(collate_pairs(pairs, pad, config.max_length, share), accelerator.device)
        logps = m(*batch_args(b, 2 * len(pairs)))
        pc, pr = logps[0::2], logps[1::2]
        rc = torch.tensor([ref[p.id][0] for p in pairs], dtype=logps.dtype, device=logps.device)
        rr = torch.tensor([ref[p.id][1] for p in pairs], dtype=logps.dtype, device=logps.device)
        losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, config.beta, config.label_smoothing)
        return LossOutput(losses.sum(), len(pairs), {
            "rewards_chosen": chosen_r.sum(), "rewards_rejected": rejected_r.sum(),
            "rewards_accuracy": (chosen_r > rejected_r).float().sum(), "rewards_margin": (chosen_r - rejected_r).sum(),
            "logps_chosen": pc.detach().sum(), "logps_rejected": pr.detach().sum(),
            "chosen_logp_drift": (pc.detach() - rc).sum()})

    result = fit("dpo", config, model=model, module=module, accelerator=accelerator, out_dir=out_dir,
                 micro_batches=[[train[i] for i in mb] for mb in plan], loss_fn=loss_fn,
                 tokens_of=lambda pairs: sum(p.tokens for p in pairs), units_of=len, fingerprint=fingerprint(config),
                 data_hash=data_hash, unit="pairs",
                 eval_batches=[held[b:b + config.batch_size] for b in range(0, len(held), config.batch_size)],
                 stop_after_steps=stop_after_steps)
    if result.stopped:
        return {"stopped_at_step": stop_after_steps, "steps": result.steps, "loss": result.loss}
    summary = {"pairs": stats.pairs, "truncated": stats.truncated, "skipped": stats.skipped,
               "eval_pairs": len(held), "eval_skipped": eval_stats.skipped, "train_tokens": stats.tokens,
               "scored_tokens": stats.scored_tokens, "steps": result.steps, "resumed_from_step": result.start_step,
               "final_loss": result.loss, **{f"final_{k}": v for k, v in result.metrics.items()},
               **(result.eval or {}), "trainable_params": result.trainable_params,
               "tokens_per_s": result.tokens_per_s, "peak_rss_mb": result.peak_rss_mb,
               "reference_cache": str(cache)}
    accelerator.wait_for_everyone()
    model = gather_trained(accelerator, model, lambda: prepare_model(config, load_base(config, ctx.precision, "cpu")[0],
                                                                     chat))
    if main:
        outputs = save_model(config, model, tok, chat, out_dir)
        ctx.stage.finish(inputs=[*config.datasets, *([config.eval_dataset] if config.eval_dataset else [])],
                         outputs=[*outputs, out_dir / "metrics.jsonl"], counts=summary)
        log(f"done: loss {result.loss:.4f}, eval {result.eval}, outputs in {out_dir}")
    accelerator.wait_for_everyone()
    return summary
