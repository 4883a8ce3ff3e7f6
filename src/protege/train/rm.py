"""Reward modelling: `protege train rm --config rm.yaml`.

A scalar head on a causal LM (transformers' `*ForSequenceClassification`, num_labels = 1),
scored at the last token of `prompt + answer`, trained with `reward_loss` on preference pairs
(InstructGPT's ranking loss with LLaMA-2's margins). The output folder is a plain HF
sequence-classification model (`AutoModelForSequenceClassification.from_pretrained(out/model)`
loads it; LoRA is merged in) with the tokenizer and chat template, so any tool can score
with it, and `protege.train.rm.load_reward_model` + `score` do so here.

The held-out report (`rm_eval.json`) gives what a user needs to trust the RM: accuracy overall
and per margin level, calibration of P(chosen > rejected) = sigmoid(r_c - r_r) as a
reliability table with its expected calibration error, the score distribution, and the reward cut-off
that best separates held-out rejected from chosen answers (`moderation`: the threshold for
`serve --moderation`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from ..errors import StageError
from ..lm_head import embed_inputs
from .fit import LossOutput, fit, pad_id, start_run
from .losses import margin_values, reward_loss
from .model import merged_fp32, prepare_model
from .pair_data import PairExample, additive_mask, can_share_prompt, collate_pairs, load_pair_sets, pairs_hash, plan_pair_batches
from .settings import PreferenceSettings, fingerprint
from .sharding import gather_trained, prepare_module

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from ..chat import ChatFormat

__all__ = ["RMConfig", "RewardModule", "run", "rm_report", "llama2_reward", "load_reward_model", "score"]


class RMConfig(PreferenceSettings):
    out_dir: str = Field("runs/rm", description="where the reward model, checkpoints, metrics and manifest go")
    learning_rate: float = Field(1e-4, gt=0.0, description="peak learning rate")
    margin: Literal["none", "raw", "llama2-small", "llama2-large"] = Field(
        "llama2-small", description="margin m in -log sigmoid(r_c - r_r - m): none, the record's margin (raw), or "
        "LLaMA-2's small {0, 1/3, 2/3, 1} / large {0, 1, 2, 3} values per rating level")
    margin_thresholds: tuple[float, float, float] = Field(
        (0.5, 1.5, 2.5), description="record margins at or above these reach rating levels 1, 2, 3 (llama2-* schemes)")
    center_coef: float = Field(0.0, ge=0.0, description="reward centring: + coef * (r_c + r_r)^2 (TRL's center_rewards_coefficient; 0.01 typical)")
    calibration_bins: int = Field(10, ge=2, description="bins of the held-out reliability table")
    share_prompt: bool = Field(True, description="encode each pair's prompt once for both answers (4-D mask; off automatically past a sliding window)")


class RewardModule(torch.nn.Module):
    """Packed batch -> one score per sequence, read at its last token (n_seqs,); DDP wraps this."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._body = (getattr(base, base.base_model_prefix),)  # tuple: not registered twice
        self._score = base.score

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, last_index: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        emb = embed_inputs(self.model, input_ids)  # None: the decoder embeds (no trainable-token rows)
        hidden = self._body[0](input_ids=None if emb is not None else input_ids, inputs_embeds=emb,
                               position_ids=position_ids,
                               attention_mask=additive_mask(attention_mask, self._body_dtype()),
                               use_cache=False).last_hidden_state  # (B, T, H)
        last = hidden.reshape(-1, hidden.shape[-1]).index_select(0, last_index)  # (n_seqs, H)
        head_dtype = next(self._score.parameters()).dtype  # fp32 when trained over a bf16 body
        return self._score(last.to(head_dtype)).squeeze(-1).float()

    def _body_dtype(self) -> torch.dtype:
        # The decoder's storage dtype (bf16 in a low-precision run), not the fp32 trainable score head's.
        return self._body[0].get_input_embeddings().weight.dtype


def rm_report(chosen: list[float], rejected: list[float], margins: list[float], bins: int = 10,
              thresholds: tuple[float, float, float] = (0.5, 1.5, 2.5)) -> dict[str, Any]:
    """Held-out accuracy (overall, per margin level), reliability table + ECE of sigmoid(r_c - r_r), score stats."""
    n = len(chosen)
    if n == 0:
        return {"pairs": 0}
    diff = [c - r for c, r in zip(chosen, rejected)]
    correct = [d > 0 for d in diff]
    # Calibration of the RM's own probability that the chosen answer wins. Symmetrised (each pair
    # seen in both orders), as the probability of "first beats second" must hold for either order.
    probs = [1.0 / (1.0 + math.exp(-d)) for d in diff] + [1.0 / (1.0 + math.exp(d)) for d in diff]
    labels = [1.0] * n + [0.0] * n
    table, ece = [], 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, p in enumerate(probs) if lo <= p < hi or (b == bins - 1 and p == 1.0)]
        if not idx:
            continue
        conf = sum(probs[i] for i in idx) / len(idx)
        acc = sum(labels[i] for i in idx) / len(idx)
        ece += len(idx) / len(probs) * abs(conf - acc)
        table.append({"bin": [round(lo, 3), round(hi, 3)], "n": len(idx), "mean_prob": round(conf, 4),
                      "frequency": round(acc, 4)})
    levels: dict[str, list[bool]] = {}
    for m, ok in zip(margins, correct):
        level = "no margin" if math.isnan(m) else f"level {sum(m >= t for t in thresholds)}"
        levels.setdefault(level, []).append(ok)
    scores = chosen + rejected
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    # A reward model's scores are not centred, so a cut-off (`serve --moderation RM --moderation-threshold X`)
    # has to come from its own scores: the one that best tells held-out rejected answers from chosen ones
    # (balanced accuracy: flag rejected, pass chosen).
    import bisect

    rej, cho = sorted(rejected), sorted(chosen)
    best = max(sorted(set(scores)), key=lambda t: (bisect.bisect_left(rej, t) + n - bisect.bisect_left(cho, t),
                                                   -abs(t - mean)))
    flag = {"threshold": round(best, 4), "rejected_flagged": round(sum(r < best for r in rejected) / n, 4),
            "chosen_flagged": round(sum(c < best for c in chosen) / n, 4)}
    return {"pairs": n, "moderation": flag, "accuracy": round(sum(correct) / n, 4),
            "accuracy_by_margin": {k: {"n": len(v), "accuracy": round(sum(v) / len(v), 4)} for k, v in sorted(levels.items())},
            "ece": round(ece, 4), "reliability": table,
            "score_mean": round(mean, 4), "score_std": round(std, 4),
            "chosen_mean": round(sum(chosen) / n, 4), "rejected_mean": round(sum(rejected) / n, 4)}


def llama2_reward(helpful: torch.Tensor, safety: torch.Tensor, safety_tagged: torch.Tensor,
                  threshold: float = 0.15) -> torch.Tensor:
    """LLaMA-2-Chat's combined reward from a helpfulness and a safety RM's scores (logits), each (B,).

    R_c = R_s where the prompt is tagged unsafe or sigmoid(R_s) < threshold, else R_h (Touvron et
    al. 2023, Sec. 3.2.2). Returned as a logit; LLaMA-2 then whitens it (done by the RL loop).
    """
    use_safety = safety_tagged.bool() | (torch.sigmoid(safety) < threshold)
    return torch.where(use_safety, safety, helpful)


def load_reward_model(spec: str, device: str | None = None) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """(sequence-classification model, tokenizer) of a reward model folder written by `train rm`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..models import ModelError, resolve

    path = resolve(spec)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load reward model {spec!r}: {err}") from None
    if model.config.num_labels != 1:
        raise ModelError(f"{spec}: a reward model has one output (num_labels = 1), this has {model.config.num_labels}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tok


@torch.no_grad()
def score(model: torch.nn.Module, chat: ChatFormat, prompts: list[list[dict[str, str]]], answers: list[str], batch_size: int = 8,
          max_length: int = 1024) -> list[float]:
    """Reward of each (prompt messages, answer text), read at the last token as in training."""
    from .data import Example, collate

    module = RewardModule(model)
    out: list[float] = []
    for b in range(0, len(prompts), batch_size):
        rows = []
        for prompt, answer in zip(prompts[b:b + batch_size], answers[b:b + batch_size]):
            ids = chat.encode(prompt + [{"role": "assistant", "content": answer}]).input_ids[-max_length:]
            rows.append([Example(ids, [-100] * len(ids))])
        batch = collate(rows, chat.tokenizer.pad_token_id or 0, with_seq_ids=True)
        dev = next(model.parameters()).device
        out.extend(module(batch["input_ids"].to(dev), batch["position_ids"].to(dev),
                          batch["last_index"].to(dev)).tolist())
    return out


def _load_classifier(config: RMConfig, pad: int, precision: Any, device: torch.device | str) -> Any:
    from transformers import AutoModelForSequenceClassification

    from ..models import quantization_kwargs, resolve
    from .model import base_dtype

    path = resolve(config.model)
    if Path(path).suffix == ".gguf":
        raise StageError("rm: start a reward model from an HF folder or alias, not a .gguf file")
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its "score.weight MISSING / lm_head UNEXPECTED" table is expected here
    try:
        # The score head starts random; the LM head of the causal checkpoint is dropped (not needed).
        dtype = getattr(torch, base_dtype(config, precision))
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=dtype, **quantization_kwargs(config.quantization, dtype, str(device)))
    except (OSError, ValueError) as err:
        raise StageError(f"rm: cannot load {config.model!r} as a sequence classifier: {err}") from None
    finally:
        hf_logging.set_verbosity(level)
    model.config.pad_token_id = pad  # HF's own forward finds the last token by it
    return model


def run(config: RMConfig, stop_after_steps: int | None = None) -> dict[str, Any]:
    """Train a reward model through `fit`, then score the held-out pairs; returns summary counts."""
    from ..chat import ChatFormat
    from ..models import load_tokenizer

    ctx = start_run("rm", config)
    accelerator, main, world, out_dir, log = ctx.accelerator, ctx.main, ctx.world, ctx.out_dir, ctx.log

    tok = load_tokenizer(config.model)
    chat = ChatFormat.from_tokenizer(tok, template=config.chat_template)
    pad = pad_id(tok)
    train, held, stats, eval_stats = load_pair_sets(config, chat, "rm")
    plan = plan_pair_batches(len(train), config.batch_size, config.epochs, config.seed)
    model = _load_classifier(config, pad, ctx.precision, accelerator.device)
    model = prepare_model(config, model, chat, task_type="SEQ_CLS").to(accelerator.device)
    model.train()
    log(f"{stats.pairs} pairs ({stats.truncated} truncated, skipped: {stats.skipped or 'none'}), {stats.tokens} tokens; "
        f"{len(plan)} micro-batches -> {ctx.steps(config, len(plan))} steps on "
        f"{world} process(es); eval on {len(held)} pairs")
    module = prepare_module(accelerator, RewardModule(model))
    share = can_share_prompt(model, config)

    def scores(m: torch.nn.Module, pairs: list[PairExample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = {k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v
             for k, v in collate_pairs(pairs, pad, config.max_length, share).items()}
        r = m(b["input_ids"], b["position_ids"], b["last_index"], b["attention_mask"])
        return r[0::2], r[1::2], b["margin"]

    def loss_fn(m: torch.nn.Module, pairs: list[PairExample]) -> LossOutput:
        rc, rr, margin = scores(m, pairs)
        losses = reward_loss(rc, rr, margin_values(margin, config.margin, config.margin_thresholds), config.center_coef)
        return LossOutput(losses.sum(), len(pairs), {"accuracy": (rc > rr).float().sum(),
                                                     "reward_margin": (rc - rr).detach().sum()})

    eval_batches = [held[b:b + config.batch_size] for b in range(0, len(held), config.batch_size)]
    result = fit("rm", config, model=model, module=module, accelerator=accelerator, out_dir=out_dir,
                 micro_batches=[[train[i] for i in mb] for mb in plan], loss_fn=loss_fn,
                 tokens_of=lambda pairs: sum(p.tokens for p in pairs), units_of=len, fingerprint=fingerprint(config),
                 data_hash=pairs_hash(train) + pairs_hash(held), unit="pairs", eval_batches=eval_batches,
                 stop_after_steps=stop_after_steps)
    if result.stopped:
        return {"stopped_at_step": stop_after_steps, "steps": result.steps, "loss": result.loss}

    # ---- held-out report (main process scores every held-out pair) -------------------------
    model = gather_trained(accelerator, model, lambda: prepare_model(
        config, _load_classifier(config, pad, ctx.precision, "cpu"), chat, task_type="SEQ_CLS"))
    report: dict[str, Any] = {"pairs": 0}
    if main and held:
        m = RewardModule(model).to(accelerator.device).eval()
        c, r, margins = [], [], []
        from tqdm.auto import tqdm

        with torch.no_grad(), accelerator.autocast():  # the precision it trained in (as fit runs the loss)
            for batch in tqdm(eval_batches, desc="rm report", unit="batch", leave=False, dynamic_ncols=True):
                rc, rr, mg = scores(m, batch)
                c += rc.tolist()
                r += rr.tolist()
                margins += mg.tolist()
        report = rm_report(c, r, margins, config.calibration_bins, config.margin_thresholds)
        (out_dir / "rm_eval.json").write_text(json.dumps(report, indent=2))
    summary = {"pairs": stats.pairs, "truncated": stats.truncated, "skipped": stats.skipped,
               "eval_pairs": len(held), "eval_skipped": eval_stats.skipped, "train_tokens": stats.tokens,
               "steps": result.steps, "resumed_from_step": result.start_step, "final_loss": result.loss,
               **(result.eval or {}), "eval_accuracy": report.get("accuracy"), "eval_ece": report.get("ece"),
               "trainable_params": result.trainable_params, "tokens_per_s": result.tokens_per_s,
               "peak_rss_mb": result.peak_rss_mb}
    accelerator.wait_for_everyone()
    if main:
        chat.apply_to(tok)
        target = out_dir / "model"
        if config.method == "lora":
            from ..precision import resolve_precision

            fp32 = config.model_copy(update={"quantization": "none"})
            final = merged_fp32(config, model,
                                load_fp32=lambda: _load_classifier(fp32, pad, resolve_precision("fp32"), "cpu"))
        else:
            final = model
        final.save_pretrained(str(target))
        tok.save_pretrained(str(target))
        ctx.stage.finish(inputs=[*config.datasets, *([config.eval_dataset] if config.eval_dataset else [])],
                         outputs=[target, out_dir / "metrics.jsonl", *([out_dir / "rm_eval.json"] if held else [])],
                         counts=summary)
        log(f"done: loss {result.loss:.4f}, held-out accuracy {report.get('accuracy')}, ECE {report.get('ece')}, "
            f"model in {target}")
    accelerator.wait_for_everyone()
    return summary
