"""`protege train pretrain`: a LLaMA-architecture model trained from random init on a text corpus.

The model is transformers' `LlamaForCausalLM` of a named size (`llama.py`); the data is the corpus
tokenized once into token files and read back as packed rows whose attention stops at document
boundaries (`pretrain_data.py`); the loop is the same `fit` every method runs, with SFT's fused LM-head
loss over every position. AdamW with betas (0.9, 0.95) and weight decay 0.1 (LLaMA's), warmup then
cosine or WSD, bf16 autocast where the device has it.

Reported: training loss, held-out loss and bits per byte (nats over text tokens / ln 2 / their UTF-8
bytes, special tokens excluded, as nanochat counts), the unigram entropy of the training tokens (the
loss a model that ignores context would reach), tokens/s, model TFLOP/s and MFU against a bf16 (or fp32)
matmul peak measured on this device at start. The output, `out_dir/model`, is an HF folder with the
tokenizer and its chat template: SFT, DPO, export and serve take it as a base like any other.

With no `tokenizer`, a byte-level BPE (`train tokenizer`'s defaults) is trained on the same corpus first,
into `out_dir/tokenizer`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, TYPE_CHECKING

import torch
from pydantic import Field, model_validator

from ..errors import StageError
from .fit import LossOutput, fit, start_run
from .losses import IGNORE_INDEX
from .settings import TrainSettings, fingerprint
from .sharding import gather_trained, prepare_module

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["PretrainConfig", "STAGE", "run", "prepare_tokens", "default_tokenizer", "measure_peak_flops", "model_shape"]

MODEL_DIR = "model"
STAGE = "train.pretrain"  # the manifest's stage name; the report finds pretraining runs by it


class PretrainConfig(TrainSettings):
    """pretraining from scratch: a LLaMA-architecture model on a text corpus (packed, document-masked)"""

    datasets: list[str] = Field(default_factory=lambda: ["builtin:python-docs"],
                                description="corpus sources: .txt/.jsonl/.parquet files, datasets:PATH_OR_NAME, builtin:python-docs")
    out_dir: str = Field("runs/pretrain", description="where the model, token files, checkpoints, metrics and manifest go")
    tokenizer: str | None = Field(None, description="tokenizer folder (from `train tokenizer`) or model alias; "
                                  "unset: train a byte-level BPE on the corpus first")
    vocab_size: int = Field(8192, ge=260, description="vocabulary of the tokenizer trained when `tokenizer` is unset")
    model: str | None = Field(None, description="continue pretraining this model (alias or HF folder; its tokenizer "
                              "and shape win) instead of a random init")
    model_size: str | None = Field("1M", description="non-embedding parameter count (500K, 3M, 1.5B): picks the depth")
    depth: int | None = Field(None, ge=1, description="layers (overrides model_size); width = depth * aspect_ratio")
    aspect_ratio: int = Field(64, ge=8, description="model width per layer of depth")
    head_dim: int = Field(64, ge=8, description="attention head size")
    gqa_group: int = Field(2, ge=1, description="query heads per key/value head (grouped-query attention; 1 = MHA)")
    tie_embeddings: bool = Field(False, description="share the embedding and LM-head matrix (LLaMA does not)")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base")
    method: Literal["full"] = Field("full", description="pretraining trains every parameter")
    max_length: int = Field(512, ge=8, description="tokens per packed row (the context length)")
    batch_size: int = Field(16, ge=1, description="rows per micro-batch per process")
    learning_rate: float = Field(2e-3, gt=0.0, description="peak learning rate")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW weight decay on matrices")
    warmup_ratio: float = Field(0.05, ge=0.0, le=1.0, description="fraction of steps of linear warmup")
    train_tokens: int | None = Field(None, ge=1, description="tokens to train on (sets max_steps; the corpus repeats "
                                     "if shorter); unset: `epochs` passes")
    text_field: str = Field("text", description="the field (.jsonl, datasets) or column (.parquet) that holds the text")
    separator: str = Field("<|endoftext|>", description="what separates documents in .txt files")
    data_dir: str | None = Field(None, description="where the token files go (default out_dir/data); runs on the same "
                                 "corpus and tokenizer may share one (a scaling sweep does)")
    val_fraction: float = Field(0.01, ge=0.0, lt=1.0, description="documents (by hash) held out for eval loss and bits per byte")
    eval_tokens: int = Field(131072, ge=0, description="held-out tokens scored at each eval (at most)")
    save_every: int = Field(200, ge=0, description="checkpoint every N optimizer steps (and always at the end)")

    # TrainSettings keys that fine-tuning reads and pretraining does not: hidden from --help, refused if set.
    unused_fields: ClassVar[frozenset[str]] = frozenset({"lora", "quantization", "eval_dataset", "eval_fraction",
                                                         "eval_max_examples", "save_merged"})

    @model_validator(mode="after")
    def _refuse_unused(self) -> "PretrainConfig":
        defaults = TrainSettings.model_fields
        set_here = [k for k in sorted(self.unused_fields & self.model_fields_set)
                    if getattr(self, k) != (defaults[k].default if defaults[k].default_factory is None
                                            else defaults[k].default_factory())]
        if set_here:
            raise ValueError(f"{', '.join(set_here)}: not used by pretraining (it trains every parameter of a new "
                             "model and holds out documents by val_fraction / eval_tokens)")
        return self


def model_shape(config: PretrainConfig, vocab: int) -> Any:
    from .llama import shape_for

    return shape_for(vocab, depth=config.depth, model_size=None if config.depth else config.model_size,
                     aspect_ratio=config.aspect_ratio, head_dim=config.head_dim, gqa_group=config.gqa_group,
                     tie=config.tie_embeddings)


def measure_peak_flops(device: torch.device | str, dtype: torch.dtype, windows: int = 5, seconds: float = 0.1) -> float:
    """Dense matmul FLOP/s of this device in `dtype` (the MFU denominator): the best of a few short timed
    windows of 1024^3 (CPU) or 8192^3 (GPU) matmuls, so one preempted window does not halve the peak."""
    gpu = torch.device(device).type == "cuda"
    n = 8192 if gpu else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best = 0.0
    for _ in range(windows):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        sync()
        best = max(best, 2.0 * n ** 3 * reps / (time.perf_counter() - t0))
    return best


def default_tokenizer(config: PretrainConfig, tok_dir: Path, log: Callable[[str], None] = print) -> str:
    """The tokenizer folder used when none is given: a `vocab_size` BPE trained on the corpus into `tok_dir`
    once (a finished one, its manifest written, is reused)."""
    from .tokenizer import TokenizerConfig, run as train_tokenizer

    if not (tok_dir / "manifest.json").exists():
        log(f"no tokenizer given: training a {config.vocab_size}-token byte-level BPE on the corpus")
        train_tokenizer(TokenizerConfig(datasets=config.datasets, out_dir=str(tok_dir), vocab_size=config.vocab_size,
                                        text_field=config.text_field, separator=config.separator, compare=[]))
    return str(tok_dir / "tokenizer")


def _tokenizer(config: PretrainConfig, out_dir: Path, log: Callable[[str], None]) -> tuple[Any, str]:
    from ..models import load_tokenizer

    source = config.model or config.tokenizer or default_tokenizer(config, out_dir / "tokenizer", log)
    return load_tokenizer(source), str(source)


def unigram_entropy(tokens: Any, vocab: int) -> float:
    """Entropy (nats) of the token frequencies: the loss of the best model that ignores context."""
    import numpy as np

    counts = np.zeros(vocab, dtype=np.int64)
    for i in range(0, len(tokens), 1 << 24):
        counts += np.bincount(np.asarray(tokens[i:i + (1 << 24)]), minlength=vocab)[:vocab]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _data_card(path: Path, key: dict[str, Any], meta: dict[str, Any], tokenizer: str) -> None:
    """What the base was trained on: each source with its provenance, licence and hash, and the token counts."""
    lines = ["# Pretraining data card", "", "| source | provenance / licence | sha256 |", "|---|---|---|"]
    for src in key["sources"]:
        prov = src.get("provenance", "user-supplied (licence: see its origin)")
        if "python" in src:
            prov += f"; CPython {src['python']}"
        lines.append(f"| {src['source']} | {prov} | {src.get('sha256', '–')} |")
    lines += ["", f"Tokenizer: {tokenizer}. Documents are split into train and held-out by a hash of their text "
              f"(held-out fraction {key['val_fraction']}).", "",
              "| split | documents | tokens | UTF-8 bytes |", "|---|---|---|---|"]
    for split in ("train", "val"):
        lines.append(f"| {split} | {meta[f'{split}_documents']:,} | {meta[f'{split}_tokens']:,} | {meta[f'{split}_bytes']:,} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def prepare_tokens(config: PretrainConfig, tok: PreTrainedTokenizerBase, tok_source: str, progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """(token files, their key): the corpus tokenized into `data_dir` (default out_dir/data), or reused."""
    from ..models.load import resolve
    from .pretrain_data import corpus_key, tokenize_corpus

    tok_dir = resolve(tok_source) if config.model or config.tokenizer else tok_source
    key = corpus_key(config.datasets, str(tok_dir), config.text_field, config.separator, config.val_fraction)
    data_dir = Path(config.data_dir) if config.data_dir else Path(config.out_dir) / "data"
    return tokenize_corpus(config.datasets, tok, data_dir, text_field=config.text_field, separator=config.separator,
                           val_fraction=config.val_fraction, key=key, progress=progress), key


def run(config: PretrainConfig, stop_after_steps: int | None = None) -> dict[str, Any]:
    """Tokenize (once), build or load the model, train with `fit`, evaluate, save. See the module docstring."""
    from .pretrain_data import PackedRows, rows_to_batch, token_byte_lengths
    from .sft import SFTModule

    if not config.datasets:
        raise StageError("pretrain: `datasets` is empty; give text files or builtin:python-docs")
    # start_run saves the config as given, before train_tokens fills max_steps: the manifest records it too, and a
    # scaling sweep compares it to find finished runs
    ctx = start_run("pretrain", config, stage=STAGE)
    accelerator, main, world, out_dir, log = ctx.accelerator, ctx.main, ctx.world, ctx.out_dir, ctx.log

    # ---- data -----------------------------------------------------------------------------
    with accelerator.main_process_first():  # the main process trains / tokenizes, the others reuse its files
        tok, tok_source = _tokenizer(config, out_dir, log)
        files, key = prepare_tokens(config, tok, tok_source, progress=main)
    train_tokens, val_tokens = files.load("train"), files.load("val")
    bos, eos = files.meta["bos"], files.meta["eos"]
    T, B = config.max_length, config.batch_size
    if len(train_tokens) < T + 1:
        raise StageError(f"pretrain: the corpus has {len(train_tokens)} training tokens, fewer than one row of "
                         f"max_length={T}; give more text or a smaller max_length")
    per_step_tokens = B * T * config.grad_accum * world
    n_rows = (len(train_tokens) - 1) // T
    if config.train_tokens:
        config = config.model_copy(update={"max_steps": max(1, round(config.train_tokens / per_step_tokens))})
    # Passes over the training rows this run makes (max_steps may cut an epoch short or repeat the corpus).
    epochs = (config.max_steps * config.grad_accum * world * B / n_rows) if config.max_steps else float(config.epochs)
    plan = PackedRows(len(train_tokens), T, B, max(epochs, 1e-9) + 1.0 / n_rows, config.seed)
    if len(plan) == 0:
        raise StageError(f"pretrain: {n_rows} rows of {T} tokens make no micro-batch of {B}; lower batch_size")
    eval_rows = min((len(val_tokens) - 1) // T, config.eval_tokens // T) if len(val_tokens) > T else 0
    # A held-out split smaller than one micro-batch is scored in one smaller batch, not skipped.
    eval_plan = PackedRows(eval_rows * T + 1, T, min(B, eval_rows), 1, 0, shuffle=False) if eval_rows else []
    if not eval_plan and config.val_fraction > 0 and config.eval_tokens > 0:
        log(f"warning: {len(val_tokens)} held-out tokens make no row of {T}: no held-out loss or bits per byte; "
            "raise val_fraction")
    byte_len = token_byte_lengths(tok)

    # ---- model ---------------------------------------------------------------------------
    shape = None if config.model else model_shape(config, len(tok))

    def new_model() -> torch.nn.Module:  # on the CPU, in fp32, every parameter trained
        if config.model:
            from ..models import load

            m = load(config.model, dtype="float32", device="cpu")[0]
        else:
            from transformers import LlamaForCausalLM

            m = LlamaForCausalLM(shape.config(T, config.rope_theta, bos_token_id=bos, eos_token_id=eos,
                                              pad_token_id=tok.pad_token_id))
        for p in m.to(torch.float32).parameters():
            p.requires_grad_(True)
        return m

    model = new_model().to(accelerator.device)
    n_params = sum(p.numel() for p in model.parameters())
    if shape is not None:
        flops_tok = shape.flops_per_token(T)
        log(f"model: {shape.describe()}")
    else:
        flops_tok = 6.0 * n_params
    peak = measure_peak_flops(accelerator.device, ctx.precision.dtype)
    if epochs > 1:
        log(f"the corpus repeats: {epochs:.2f} passes over {n_rows * T:,} training tokens")
    log(f"{files.meta['train_tokens']:,} training tokens ({files.meta['train_documents']:,} documents), "
        f"{files.meta['val_tokens']:,} held out; {ctx.steps(config, len(plan))} steps of {per_step_tokens:,} tokens "
        f"on {world} process(es); {flops_tok / 1e6:.1f} MFLOPs/token; device peak {peak / 1e12:.2f} TFLOP/s (measured)")
    # held-out scoring calls `hidden` and `loss` instead of forward (FSDP must gather around them too)
    module = prepare_module(accelerator, SFTModule(model, config.logits_chunk), forward_methods=("hidden", "loss"))

    def batch_of(starts: list[int], tokens: Any) -> dict[str, torch.Tensor]:
        return {k: v.to(accelerator.device) for k, v in rows_to_batch(tokens, starts, T, bos, eos).items()}

    def units_of(starts: list[int]) -> int:  # learned tokens, before the forward pass (DeepSpeed needs them)
        return int((rows_to_batch(train_tokens, starts, T, bos, eos)["labels"] != IGNORE_INDEX).sum())

    def loss_fn(m: torch.nn.Module, starts: list[int]) -> LossOutput:
        b = batch_of(starts, train_tokens)
        n = int((b["labels"] != IGNORE_INDEX).sum())
        return LossOutput(m(b["input_ids"], b["position_ids"], b["labels"], normalizer=1.0), n)

    def eval_fn(m: Any, starts: list[int]) -> LossOutput:  # `m` unwrapped: `evaluate` never calls DDP's forward
        b = batch_of(starts, val_tokens)
        labels = b["labels"]
        n = int((labels != IGNORE_INDEX).sum())
        hidden = m.hidden(b["input_ids"], b["position_ids"])  # one decoder pass for both losses
        loss = m.loss(hidden, labels, normalizer=1.0)
        # Bits per byte: nats over text tokens only (a special token stands for no bytes), per UTF-8 byte.
        lens = byte_len.to(labels.device)[labels.clamp(min=0)] * (labels != IGNORE_INDEX)
        text_labels = torch.where(lens > 0, labels, torch.full_like(labels, IGNORE_INDEX))
        text_nats = m.loss(hidden, text_labels, normalizer=1.0)
        return LossOutput(loss, n, {"text_nats": text_nats, "bytes": float(lens.sum())})

    # ---- train -----------------------------------------------------------------------------
    result = fit("pretrain", config, model=model, module=module, accelerator=accelerator, out_dir=out_dir,
                 micro_batches=plan, loss_fn=loss_fn, tokens_of=lambda starts: len(starts) * T, units_of=units_of,
                 fingerprint={**fingerprint(config), "corpus": key}, data_hash=f"rows{n_rows}x{T}",
                 unit="tok", eval_batches=eval_plan, eval_fn=eval_fn, stop_after_steps=stop_after_steps,
                 betas=(0.9, 0.95), flops_per_token=flops_tok, peak_flops=peak)
    if result.stopped:
        return {"stopped_at_step": stop_after_steps, "steps": result.steps, "loss": result.loss}

    # ---- finish ----------------------------------------------------------------------------
    ev = result.eval or {}
    bpb = (ev["eval_text_nats"] / ev["eval_bytes"] / math.log(2)) if ev.get("eval_bytes") else None
    trained = result.steps * per_step_tokens
    summary = {"params": n_params, "non_embedding_params": shape.non_embedding if shape else None,
               "depth": shape.depth if shape else None, "width": shape.width if shape else None,
               "flops_per_token": flops_tok, "train_tokens": trained, "train_flops": flops_tok * trained,
               "epochs": round(epochs, 4), "corpus_train_tokens": files.meta["train_tokens"],
               "corpus_val_tokens": files.meta["val_tokens"], "steps": result.steps,
               "resumed_from_step": result.start_step, "final_loss": result.loss,
               "eval_loss": ev.get("eval_loss"), "eval_bpb": None if bpb is None else round(bpb, 5),
               "eval_tokens": eval_rows * T if eval_plan else 0,
               "unigram_entropy": round(unigram_entropy(train_tokens, len(tok)), 5),
               "tokens_per_s": result.tokens_per_s, "peak_flops": peak,
               "mfu": round(result.tokens_per_s * flops_tok / peak, 5) if peak else None,
               "peak_rss_mb": result.peak_rss_mb}
    accelerator.wait_for_everyone()
    model = gather_trained(accelerator, model, new_model)
    if main:
        from ..chat import ChatFormat

        target = out_dir / MODEL_DIR
        _data_card(out_dir / "data_card.md", key, files.meta, tok_source)
        model.save_pretrained(str(target))
        ChatFormat.from_tokenizer(tok).apply_to(tok)
        tok.save_pretrained(str(target))
        ctx.stage.finish(inputs=[d for d in config.datasets if Path(d).is_file()],
                         outputs=[target, out_dir / "metrics.jsonl", out_dir / "data_card.md"], counts=summary,
                         extra={"corpus": key})
        log(f"done: loss {result.loss:.4f}, eval loss {summary['eval_loss']}, bits/byte {summary['eval_bpb']}, "
            f"unigram entropy {summary['unigram_entropy']}; model in {target}")
    accelerator.wait_for_everyone()
    return summary
