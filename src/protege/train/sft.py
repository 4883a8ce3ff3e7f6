"""Supervised fine-tuning: `protege train sft --config sft.yaml`.

Reads conversations, learns the assistant turns (every turn of a multi-turn
conversation; the prompt tokens only give context), and writes a LoRA adapter (or
full weights) as an HF folder with tokenizer and chat template, plus checkpoints,
`metrics.jsonl`, TensorBoard events, the resolved config and `manifest.json`.

The loop, top to bottom: plan every micro-batch of the run from the seed -> for each
optimizer step, the ranks split that step's micro-batches, each computes
`sum CE / (labelled tokens of the whole step)` on its share, gradients are summed by
DDP -> clip -> AdamW -> schedule. That normalisation makes one process with
accumulation and N processes give the same loss and update (to float rounding).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from ..config import StageConfig, save_config
from ..errors import StageError
from ..manifest import write_manifest
from .data import Example, TokenStats, collate, load_conversations, plan_micro_batches, tokenize
from .losses import IGNORE_INDEX, sft_loss
from .loop import (MetricsLogger, latest_checkpoint, load_checkpoint, make_optimizer, make_scheduler, peak_rss_mb,
                   save_checkpoint, set_seed)

__all__ = ["LoraSettings", "SFTConfig", "SFTModule", "run"]


class LoraSettings(StageConfig):
    r: int = Field(16, description="LoRA rank")
    alpha: float = Field(32.0, description="LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = Field(0.05, description="dropout on the LoRA input")
    target_modules: str | list[str] = Field("all-linear", description="module names to adapt, or all-linear (every linear layer but the LM head)")
    trainable_tokens: Literal["auto", "none"] | list[str] = Field(
        "auto", description="tokens whose embedding and LM-head rows are trained too (PEFT trainable tokens): "
        "auto = the chat format's special tokens (role markers, end of turn), none, or a list of token strings")


class SFTConfig(StageConfig):
    model: str = Field("gemma-3-270m", description="base model: built-in alias, HF folder (also a LoRA adapter folder) or .gguf")
    datasets: list[str] = Field(default_factory=list, description="conversation files, trained in this order (Orca's progressive learning)")
    out_dir: str = Field("runs/sft", description="where the adapter/model, checkpoints, metrics and manifest go")
    eval_dataset: str | None = Field(None, description="held-out conversations for eval loss (default: split off eval_fraction)")
    eval_fraction: float = Field(0.05, description="fraction of each dataset held out for eval loss when eval_dataset is unset")
    eval_max_examples: int = Field(200, description="cap on held-out examples")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's / built-in default")
    train_on: Literal["assistant", "all"] = Field("assistant", description="learn assistant tokens only, or every token (continued pretraining)")
    method: Literal["lora", "full"] = Field("lora", description="LoRA adapters (PEFT) or full fine-tuning")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings (method: lora)")
    max_length: int = Field(1024, description="tokens per row; longer conversations are truncated")
    packing: bool = Field(True, description="pack several conversations per row (no cross-attention); else length-grouped batches")
    batch_size: int = Field(4, description="rows per micro-batch per process")
    grad_accum: int = Field(1, description="micro-batches per optimizer step per process")
    epochs: int = Field(1, description="passes over each dataset")
    max_steps: int | None = Field(None, description="stop after this many optimizer steps (also sets the schedule length)")
    learning_rate: float = Field(2e-4, description="peak learning rate")
    weight_decay: float = Field(0.0, description="AdamW weight decay (not on biases/norms)")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR decay after warmup")
    warmup_ratio: float = Field(0.03, description="fraction of steps of linear warmup")
    max_grad_norm: float = Field(1.0, description="gradient clipping norm (0 = off)")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="autocast precision (bf16 is not always faster on CPU)")
    logits_chunk: int = Field(256, description="labelled positions per LM-head chunk (memory vs speed)")
    seed: int = Field(0, description="seed for data order, LoRA init and dropout")
    save_every: int = Field(100, description="checkpoint every N optimizer steps (and always at the end)")
    keep_checkpoints: int = Field(2, description="newest checkpoints kept")
    eval_every: int = Field(0, description="eval loss every N steps (0 = only at the end)")
    log_every: int = Field(1, description="metrics row every N steps")
    save_merged: bool = Field(False, description="also write the merged full model (LoRA folded in) to out_dir/merged")
    resume: Literal["auto", "yes", "no"] = Field("auto", description="auto: continue from out_dir's checkpoint if the config is unchanged; yes: require one; no: start over")
    tensorboard: bool = Field(True, description="write TensorBoard events next to metrics.jsonl")

    @field_validator("resume", mode="before")
    @classmethod
    def _yaml_yes_no(cls, value: Any) -> Any:
        # YAML reads a bare `yes`/`no` as a boolean.
        return {True: "yes", False: "no"}.get(value, value) if isinstance(value, bool) else value


# Keys that may change between a run and its resume without changing what is trained.
_RESUME_NEUTRAL = {"resume", "save_merged", "tensorboard", "log_every", "eval_every", "save_every", "keep_checkpoints"}


def _fingerprint(config: SFTConfig) -> dict[str, Any]:
    return {k: v for k, v in config.model_dump(mode="json").items() if k not in _RESUME_NEUTRAL}


class SFTModule(torch.nn.Module):
    """Causal LM body + chunked LM head -> SFT loss; DDP wraps this so gradients sync.

    Calling the decoder (`get_decoder()`) instead of the full model skips the LM head for
    the unlabelled positions; `sft_loss` applies it (with tied weights and Gemma's
    final-logit soft-capping) only where there are labels.
    """

    def __init__(self, model: torch.nn.Module, logits_chunk: int = 256):
        super().__init__()
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # A tuple, not attributes: submodules of `model` must not be registered twice (DDP, state_dict).
        self._parts = (base.get_decoder(), base.get_output_embeddings())
        self.softcap = getattr(base.config, "final_logit_softcapping", None)
        self.logits_chunk = logits_chunk

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                normalizer: float | None = None) -> torch.Tensor:
        decoder, head = self._parts
        hidden = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=None,
                               use_cache=False).last_hidden_state  # (B, T, H)
        weight, override = _head_rows(head)
        return sft_loss(hidden, weight, labels, normalizer=normalizer, softcap=self.softcap,
                        chunk_size=self.logits_chunk, row_override=override)


def _log(msg: str, out_dir: Path | None = None, main: bool = True) -> None:
    if not main:
        return
    line = f"[protege sft] {msg}"
    print(line, file=sys.stderr, flush=True)
    if out_dir is not None:
        with (out_dir / "train.log").open("a", encoding="utf-8") as fh:
            fh.write(time.strftime("%Y-%m-%d %H:%M:%S ") + line + "\n")


def _split(convs: list, fraction: float, cap: int, seed: int) -> tuple[list, list]:
    n_eval = min(cap, int(len(convs) * fraction))
    if n_eval == 0:
        return convs, []
    idx = list(range(len(convs)))
    random.Random(f"{seed}/eval").shuffle(idx)
    held = set(idx[:n_eval])
    return [c for i, c in enumerate(convs) if i not in held], [c for i, c in enumerate(convs) if i in held]


def chat_special_tokens(chat: Any) -> list[int]:
    """Special-token ids the chat format writes (BOS, role markers, end of turn), pad excluded.

    A base model has rarely or never seen them: gemma-3-270m ranks `<end_of_turn>` ~261,800th of
    262,144 after a finished answer, and LoRA on the linear layers cannot move its embedding or
    LM-head row, so a LoRA student kept talking past every answer (0 of 50 stopped).
    """
    tok = chat.tokenizer
    sample = chat.encode([{"role": "system", "content": "a"}, {"role": "user", "content": "b"},
                          {"role": "assistant", "content": "c"}]).input_ids
    special = set(tok.all_special_ids) - {tok.pad_token_id}
    return sorted({i for i in sample if i in special} | set(chat.stop_token_ids))


def _token_ids(config: SFTConfig, chat: Any) -> list[int]:
    want = config.lora.trainable_tokens
    if want == "none":
        return []
    if want == "auto":
        return chat_special_tokens(chat)
    tok = chat.tokenizer
    ids = tok.convert_tokens_to_ids(list(want))
    unknown = [t for t, i in zip(want, ids) if i is None or i == tok.unk_token_id]
    if unknown:
        raise StageError(f"sft: lora.trainable_tokens: {unknown} are not single tokens of this tokenizer")
    return sorted(set(ids))


def _prepare_model(config: SFTConfig, model: torch.nn.Module, chat: Any) -> torch.nn.Module:
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    ids = _token_ids(config, chat)
    tokens: dict[str, list[int]] | None = None
    if ids:
        names = {m: n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        tokens = {names[emb]: ids}
        if head is not None and head.weight is not emb.weight:  # tied heads follow the embedding in PEFT
            tokens[names[head]] = ids
    lc = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                    target_modules=config.lora.target_modules, trainable_token_indices=tokens, task_type="CAUSAL_LM")
    return get_peft_model(model, lc)


def _head_rows(head: torch.nn.Module) -> tuple[torch.Tensor, Any]:
    """(frozen head weight, (ids, trainable rows) or None) of a plain or PEFT-trainable-tokens LM head."""
    layer = getattr(head, "token_adapter", None)
    if layer is None or not layer.active_adapters or layer.disable_adapters:
        return head.weight, None
    name = layer.active_adapters[0]
    ids = torch.tensor(layer.token_indices[name], device=layer.base_layer.weight.device)
    return layer.base_layer.weight, (ids, layer.trainable_tokens_delta[name])


@torch.no_grad()
def _eval_loss(module: torch.nn.Module, batches: list[list[list[Example]]], pad_id: int, device: Any,
               accelerator: Any) -> float | None:
    """Token-weighted mean loss over held-out micro-batches, sharded over ranks."""
    if not batches:
        return None
    # Unwrapped: DDP's forward runs collectives (buffer broadcast), and ranks may get unequal shares.
    module = accelerator.unwrap_model(module)
    was_training = module.training
    module.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for rows in batches[accelerator.process_index::accelerator.num_processes]:
        b = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
        n = int((b["labels"] != IGNORE_INDEX).sum())
        total[0] += float(module(**b, normalizer=1.0))
        total[1] += n
    total = accelerator.reduce(total, "sum")
    module.train(was_training)
    return float(total[0] / total[1].clamp(min=1))


def _save_outputs(config: SFTConfig, model: torch.nn.Module, tok: Any, chat: Any, out_dir: Path) -> list[Path]:
    """LoRA adapter (or full model) folder, and the merged model on request, each with tokenizer + template."""
    chat.apply_to(tok)
    outputs = []
    target = out_dir / ("adapter" if config.method == "lora" else "model")
    model.save_pretrained(str(target))
    tok.save_pretrained(str(target))
    outputs.append(target)
    if config.save_merged and config.method == "lora":
        merged = model.merge_and_unload()
        merged.save_pretrained(str(out_dir / "merged"))
        tok.save_pretrained(str(out_dir / "merged"))
        outputs.append(out_dir / "merged")
    return outputs


def run(config: SFTConfig, stop_after_steps: int | None = None) -> dict[str, Any]:
    """Train, checkpoint, evaluate and save; returns summary counts. See the module docstring.

    `stop_after_steps` ends the run early (after a checkpoint) as if it had been killed; rerunning
    resumes. Tests use it; users interrupt with Ctrl-C or kill.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from ..chat import ChatFormat
    from ..models import load

    t_start = time.time()
    if not config.datasets:
        raise StageError("sft: `datasets` is empty; give one or more conversation files (datasets: [a.jsonl])")
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = out_dir / "checkpoints"
    set_seed(config.seed)

    # ---- data -----------------------------------------------------------------------------
    model, tok = load(config.model, device="cpu")
    chat = ChatFormat.from_tokenizer(tok, template=config.chat_template)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    stats, eval_stats = TokenStats(), TokenStats()
    train_sets, eval_convs = [], []
    for path in config.datasets:
        convs = load_conversations(path)
        if config.eval_dataset is None:
            convs, held = _split(convs, config.eval_fraction, config.eval_max_examples // len(config.datasets),
                                 config.seed)
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
    eval_batches = [[[eval_examples[i] for _, i in row] for row in mb] for mb in eval_plan]
    per_step = config.grad_accum * world
    # max_steps may be shorter than the plan (cut) or longer (the plan wraps around).
    total_steps = config.max_steps if config.max_steps is not None else math.ceil(len(plan) / per_step)
    warmup = int(config.warmup_ratio * total_steps)
    data_hash = hashlib.sha256(json.dumps(plan).encode()).hexdigest()[:16]

    # ---- model, optimizer, resume ----------------------------------------------------------
    model = _prepare_model(config, model, chat).to(accelerator.device)
    model.train()
    optimizer = make_optimizer(model, config.learning_rate, config.weight_decay)
    scheduler = make_scheduler(optimizer, config.schedule, warmup, total_steps)
    metrics = MetricsLogger(out_dir, enabled=main, tensorboard=config.tensorboard)
    start_step = 0
    latest = latest_checkpoint(ckpt_root)
    if config.resume == "yes" and latest is None:
        raise StageError(f"sft: resume requested but {ckpt_root} holds no checkpoint")
    if latest is not None and config.resume == "no":
        _log(f"resume=no: ignoring and replacing checkpoints in {ckpt_root}", out_dir, main)
        latest = None
    if latest is not None:
        saved = json.loads((latest / "state.json").read_text())
        if saved.get("fingerprint") != _fingerprint(config) or saved.get("data_hash") != data_hash:
            before, now = saved.get("fingerprint", {}), _fingerprint(config)
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k)) or ["the data"]
            raise StageError(f"sft: {out_dir} holds a checkpoint ({latest.name}) of a different run "
                             f"(changed: {', '.join(changed)}); use another out_dir or resume=no to start over")
        state = load_checkpoint(latest, model, optimizer, scheduler)
        start_step = state["step"]
        metrics.truncate_after(start_step)
        _log(f"resuming from checkpoint {latest} at step {start_step}/{total_steps} (config unchanged)", out_dir, main)
    elif main:
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    if main:
        save_config(config, out_dir)
    _log(f"{stats.conversations} conversations ({stats.truncated} truncated, {stats.dropped_no_labels} without "
         f"labels), {stats.tokens} tokens ({stats.label_tokens} learned); {len(plan)} micro-batches -> "
         f"{total_steps} steps on {world} process(es); eval on {len(eval_examples)} conversations", out_dir, main)
    module = accelerator.prepare_model(SFTModule(model, config.logits_chunk))
    trainable = [p for p in model.parameters() if p.requires_grad]

    def checkpoint(step: int) -> None:
        accelerator.wait_for_everyone()
        if main:
            save_checkpoint(ckpt_root, step, model, optimizer, scheduler,
                            {"fingerprint": _fingerprint(config), "data_hash": data_hash,
                             "micro_batches_done": min(step * per_step, len(plan))}, keep=config.keep_checkpoints)
        accelerator.wait_for_everyone()

    # ---- train -----------------------------------------------------------------------------
    bar = tqdm(total=total_steps, initial=start_step, desc="sft", disable=not main, dynamic_ncols=True)
    tokens_seen, t0, last_loss, stopped = 0, time.time(), float("nan"), False
    for step in range(start_step, total_steps):
        mbs = plan[(step * per_step) % len(plan):][:per_step]
        rows_of = [[[train_sets[d][i] for d, i in row] for row in mb] for mb in mbs]
        n_labels = sum(e.n_labels for mb in rows_of for row in mb for e in row)
        mine = rows_of[rank::world]
        weight = 1.0
        if not mine:  # a short last step: this rank must still join the gradient all-reduce
            mine, weight = rows_of[:1], 0.0
        step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        step_tokens = sum(len(e.input_ids) for mb in rows_of for row in mb for e in row)  # all ranks
        for j, rows in enumerate(mine):
            batch = {k: v.to(accelerator.device) for k, v in collate(rows, pad_id).items()}
            sync = contextlib.nullcontext() if j == len(mine) - 1 else accelerator.no_sync(module)
            with sync:
                # x world: DDP averages gradients over ranks, we want their sum (see module docstring).
                loss = module(**batch, normalizer=n_labels / world) * weight
                accelerator.backward(loss)
            step_loss += loss.detach().double() / world
        tokens_seen += step_tokens
        grad_norm = (float(accelerator.clip_grad_norm_(trainable, config.max_grad_norm))
                     if config.max_grad_norm > 0 else float("nan"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        last_loss = float(accelerator.reduce(step_loss, "sum"))
        done = step + 1
        tok_s = tokens_seen / max(time.time() - t0, 1e-9)
        bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tok_s:.0f}")
        bar.update(1)
        if done % config.log_every == 0 or done == total_steps:
            metrics.log(done, loss=last_loss, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                        tokens_per_s=round(tok_s, 2), tokens=step_tokens, label_tokens=n_labels)
        if config.eval_every and done % config.eval_every == 0 and done < total_steps:
            metrics.log(done, eval_loss=_eval_loss(module, eval_batches, pad_id, accelerator.device, accelerator))
        if done == stop_after_steps and done < total_steps:
            checkpoint(done)
            stopped = True
            break
        if config.save_every and done % config.save_every == 0 and done < total_steps:
            checkpoint(done)
    bar.close()
    if stopped:
        _log(f"stopped after step {stop_after_steps} (checkpoint saved; rerun to resume)", out_dir, main)
        metrics.close()
        return {"stopped_at_step": stop_after_steps, "steps": total_steps, "loss": last_loss}

    # ---- finish ----------------------------------------------------------------------------
    if start_step < total_steps or latest_checkpoint(ckpt_root) is None:
        checkpoint(total_steps)
    eval_loss = _eval_loss(module, eval_batches, pad_id, accelerator.device, accelerator)
    if eval_loss is not None:
        metrics.log(total_steps, eval_loss=eval_loss)
    metrics.close()
    summary = {"conversations": stats.conversations, "truncated": stats.truncated,
               "dropped_no_labels": stats.dropped_no_labels, "train_tokens": stats.tokens,
               "label_tokens": stats.label_tokens, "eval_conversations": len(eval_examples), "steps": total_steps,
               "resumed_from_step": start_step, "final_loss": last_loss, "eval_loss": eval_loss,
               "trainable_params": sum(p.numel() for p in trainable),
               "tokens_per_s": round(tokens_seen / max(time.time() - t0, 1e-9), 2),
               "peak_rss_mb": round(peak_rss_mb(), 1)}
    accelerator.wait_for_everyone()
    if main:
        outputs = _save_outputs(config, model, tok, chat, out_dir)
        write_manifest(out_dir, "sft", config, inputs=[*config.datasets, *([config.eval_dataset] if config.eval_dataset else [])],
                       outputs=[*outputs, out_dir / "metrics.jsonl"], counts=summary,
                       seconds=time.time() - t_start)
        _log(f"done: loss {last_loss:.4f}, eval loss {eval_loss}, outputs in {out_dir}", out_dir, main)
    accelerator.wait_for_everyone()
    return summary
