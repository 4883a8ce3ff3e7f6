"""Supervised fine-tuning: `protege train sft --config sft.yaml`.

Reads conversations, learns the assistant turns (every turn of a multi-turn
conversation; the prompt tokens only give context), and writes a LoRA adapter (or
full weights) as an HF folder with tokenizer and chat template, plus checkpoints,
`metrics.jsonl`, TensorBoard events, the resolved config and `manifest.json`.

SFT is the simplest client of `fit`: its micro-batches are packed rows of conversations
(planned up front from the seed), its loss is the sum of cross-entropies over labelled
tokens, and `fit` divides by the labelled tokens of the whole optimizer step, so one
process with accumulation and N processes give the same loss and update.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from ..chat import write_chat_meta
from ..errors import StageError
from ..files import json_digest
from ..lm_head import embed_inputs, head_rows
from .data import Example, TokenStats, collate, load_conversations, plan_micro_batches, split_held_out, tokenize
from .fit import LossOutput, fit, pad_id, start_run
from .losses import IGNORE_INDEX, sft_loss
from .model import chat_special_tokens, load_base, prepare_model, require_head_parts, save_model
from .settings import LoraSettings, TrainSettings, fingerprint
from .sharding import gather_trained, prepare_module

__all__ = ["LoraSettings", "SFTConfig", "SFTModule", "chat_special_tokens", "save_model", "run"]


class SFTConfig(TrainSettings):
    """supervised fine-tuning on conversations (loss on assistant turns; LoRA or full)"""

    datasets: list[str] = Field(default_factory=list, description="conversation files, trained in this order (Orca's progressive learning)")
    out_dir: str = Field("runs/sft", description="where the adapter/model, checkpoints, metrics and manifest go")
    train_on: Literal["assistant", "all"] = Field("assistant", description="learn assistant tokens only, or every token (continued pretraining)")
    packing: bool = Field(True, description="pack several conversations per row (no cross-attention); else length-grouped batches")


class SFTModule(torch.nn.Module):
    """Causal LM body + chunked LM head -> SFT loss; DDP wraps this so gradients sync.

    Calling the decoder instead of the full model skips the LM head for the unlabelled
    positions; `sft_loss` applies it (with tied weights and Gemma's final-logit soft-capping)
    only where there are labels, computing its gradient in the same pass (the fused path:
    SFT knows d loss / d logits at forward time, unlike DPO, see `logprobs.py`).
    """

    def __init__(self, model: torch.nn.Module, logits_chunk: int = 256):
        super().__init__()
        self.model = model
        # A plain object, not attributes: submodules of `model` must not be registered twice (DDP, state_dict).
        self._parts = require_head_parts(model, "sft")
        self.logits_chunk = logits_chunk

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                normalizer: float | None = None) -> torch.Tensor:
        return self.loss(self.hidden(input_ids, position_ids), labels, normalizer)

    def hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The decoder's final hidden states (B, T, H)."""
        emb = embed_inputs(self.model, input_ids)  # None: the decoder embeds (no trainable-token rows)
        return self._parts.decoder(input_ids=None if emb is not None else input_ids, inputs_embeds=emb,
                                   position_ids=position_ids, attention_mask=None, use_cache=False).last_hidden_state

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, normalizer: float | None = None) -> torch.Tensor:
        """SFT loss of `labels` on given hidden states (several label sets may share one decoder pass)."""
        parts = self._parts
        weight, override = head_rows(parts.head)
        return sft_loss(hidden, weight, labels, normalizer=normalizer, softcap=parts.softcap,
                        chunk_size=self.logits_chunk, row_override=override)


def _positive_marker(datasets: list[str]) -> dict[str, str] | None:
    """The positive marker (and its placement) that `curate`'s tag step wrote into the training data's manifest."""
    from ..manifest import find_in_manifests

    found = {(m["positive"], m["placement"]) for m in find_in_manifests(datasets, "markers")
             if isinstance(m, dict) and isinstance(m.get("positive"), str) and m.get("placement")}
    if len(found) > 1:
        raise StageError(f"the training datasets were tagged with different markers {sorted(found)}; tag them alike")
    if not found:
        return None
    positive, placement = found.pop()
    return {"positive": positive, "placement": placement}


def run(config: SFTConfig, stop_after_steps: int | None = None) -> dict[str, Any]:
    """Train, checkpoint, evaluate and save; returns summary counts. See the module docstring.

    `stop_after_steps` ends the run early (after a checkpoint) as if it had been killed; rerunning
    resumes. Tests use it; users interrupt with Ctrl-C or kill.
    """
    from ..chat import ChatFormat

    if not config.datasets:
        raise StageError("sft: `datasets` is empty; give one or more conversation files (datasets: [a.jsonl])")
    ctx = start_run("sft", config)
    accelerator, main, world, out_dir, log = ctx.accelerator, ctx.main, ctx.world, ctx.out_dir, ctx.log

    # ---- data -----------------------------------------------------------------------------
    model, tok = load_base(config, ctx.precision, accelerator.device)
    chat = ChatFormat.from_tokenizer(tok, template=config.chat_template)
    pad = pad_id(tok)
    stats, eval_stats = TokenStats(), TokenStats()
    train_sets, eval_convs = [], []
    for path in config.datasets:
        convs = load_conversations(path)
        if config.eval_dataset is None:
            convs, held = split_held_out(convs, config.eval_fraction,
                                         config.eval_max_examples // len(config.datasets), config.seed)
            eval_convs.extend(held)
        train_sets.append(tokenize(convs, chat, config.max_length, config.train_on == "all", stats))
    if config.eval_dataset:
        eval_convs = load_conversations(config.eval_dataset)[: config.eval_max_examples]
    eval_examples = tokenize(eval_convs, chat, config.max_length, config.train_on == "all", eval_stats)
    if not any(train_sets):
        raise StageError("sft: no training example has an assistant token left after truncation "
                         f"(max_length={config.max_length}); raise max_length")
    plan = plan_micro_batches(train_sets, config.batch_size, config.max_length, config.packing, config.epochs,
                              config.seed)
    eval_plan = plan_micro_batches([eval_examples], config.batch_size, config.max_length, config.packing, 1,
                                   config.seed) if eval_examples else []
    # Micro-batches as rows of Examples (train: addressed in the plan as (dataset, index)).
    train_batches = [[[train_sets[d][i] for d, i in row] for row in mb] for mb in plan]
    eval_batches = [[[eval_examples[i] for _, i in row] for row in mb] for mb in eval_plan]
    data_hash = json_digest(plan, 16)

    # ---- model ---------------------------------------------------------------------------
    model = prepare_model(config, model, chat).to(accelerator.device)
    model.train()
    log(f"{stats.conversations} conversations ({stats.truncated} truncated, {stats.dropped_no_labels} without "
        f"labels), {stats.tokens} tokens ({stats.label_tokens} learned); {len(plan)} micro-batches -> "
        f"{ctx.steps(config, len(plan))} steps on {world} process(es); "
        f"eval on {len(eval_examples)} conversations")
    module = prepare_module(accelerator, SFTModule(model, config.logits_chunk))

    def loss_fn(m: torch.nn.Module, rows: list[list[Example]]) -> LossOutput:
        b = {k: v.to(accelerator.device) for k, v in collate(rows, pad).items()}
        n = int((b["labels"] != IGNORE_INDEX).sum())
        return LossOutput(m(b["input_ids"], b["position_ids"], b["labels"], normalizer=1.0), n)

    # ---- train -----------------------------------------------------------------------------
    result = fit("sft", config, model=model, module=module, accelerator=accelerator, out_dir=out_dir,
                 micro_batches=train_batches, loss_fn=loss_fn,
                 tokens_of=lambda rows: sum(len(e.input_ids) for row in rows for e in row),
                 units_of=lambda rows: sum(e.n_labels for row in rows for e in row),
                 fingerprint=fingerprint(config), data_hash=data_hash, unit="label_tokens",
                 eval_batches=eval_batches, stop_after_steps=stop_after_steps)
    if result.stopped:
        return {"stopped_at_step": stop_after_steps, "steps": result.steps, "loss": result.loss}

    # ---- finish ----------------------------------------------------------------------------
    eval_loss = result.eval["eval_loss"] if result.eval else None
    summary = {"conversations": stats.conversations, "truncated": stats.truncated,
               "dropped_no_labels": stats.dropped_no_labels, "train_tokens": stats.tokens,
               "label_tokens": stats.label_tokens, "eval_conversations": len(eval_examples), "steps": result.steps,
               "resumed_from_step": result.start_step, "final_loss": result.loss, "eval_loss": eval_loss,
               "trainable_params": result.trainable_params, "tokens_per_s": result.tokens_per_s,
               "peak_rss_mb": result.peak_rss_mb}
    accelerator.wait_for_everyone()
    model = gather_trained(accelerator, model, lambda: prepare_model(config, load_base(config, ctx.precision, "cpu")[0],
                                                                     chat))
    if main:
        outputs = save_model(config, model, tok, chat, out_dir)
        marker = _positive_marker(config.datasets)
        for folder in outputs:  # Koala-style conditioning: serving puts the positive marker in every prompt
            write_chat_meta(folder, marker)
        ctx.stage.finish(inputs=[*config.datasets, *([config.eval_dataset] if config.eval_dataset else [])],
                         outputs=[*outputs, out_dir / "metrics.jsonl"], counts=summary, extra={"marker": marker} if marker else None)
        log(f"done: loss {result.loss:.4f}, eval loss {eval_loss}, outputs in {out_dir}")
    accelerator.wait_for_everyone()
    return summary
