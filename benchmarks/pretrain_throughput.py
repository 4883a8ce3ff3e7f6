"""Pretraining throughput: protege's `train pretrain` vs Hugging Face `Trainer`, same model, data, batch, precision.

    python benchmarks/pretrain_throughput.py [--steps 20] [--warmup 3] [--precision bf16] [--size 3M]

The model is the same `LlamaConfig` on both sides (protege's `model_size` shape, vocabulary from a byte-level
BPE trained here), random init from the same seed; the data is the same token file (TinyStories from the
shared pretraining folder when present, else the built-in `builtin:python-stdlib` corpus) cut into the
same rows of `--length` tokens; batch `--batch` rows per step, AdamW (0.9, 0.95), weight decay 0.1, the
same peak learning rate. The Trainer side is what a transformers user writes for causal-LM pretraining
(`labels = input_ids`, `bf16=True`, `use_cpu=True`, no evaluation or saving during the timed steps);
protege additionally masks attention at document boundaries. Each side runs in its own subprocess;
tokens/s counts every input token over the steps after warm-up; MFU is against a bf16 (or fp32) matmul
peak measured in the same process. litgpt was not tried (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain" / "tinystories" / "train.txt"


def prepare(workdir: Path, vocab: int) -> tuple[str, str]:
    """(corpus source, tokenizer folder), made once in `workdir`."""
    from protege.train.tokenizer import TokenizerConfig, run

    source = str(SHARED) if SHARED.exists() else "builtin:python-stdlib"
    tok_dir = workdir / "tok"
    if not (tok_dir / "tokenizer" / "tokenizer.json").exists():
        run(TokenizerConfig(datasets=[source], out_dir=str(tok_dir), vocab_size=vocab, compare=[]))
    return source, str(tok_dir / "tokenizer")


def _config(args: argparse.Namespace, source: str, tok: str, out: Path):
    from protege.train.pretrain import PretrainConfig

    return PretrainConfig(datasets=[source], tokenizer=tok, out_dir=str(out), data_dir=str(out.parent / "data"),
                          model_size=args.size, max_length=args.length, batch_size=args.batch,
                          max_steps=args.warmup + args.steps, learning_rate=1e-3, warmup_ratio=0.0, schedule="constant",
                          precision=args.precision, val_fraction=0.01, eval_tokens=0, save_every=0, tensorboard=False,
                          resume="no", log_every=1)


def run_protege(args: argparse.Namespace, workdir: Path) -> dict:
    from protege.train.pretrain import run
    from protege.train.state import peak_rss_mb

    source, tok = prepare(workdir, args.vocab)
    out = workdir / f"protege-{args.precision}"
    summary = run(_config(args, source, tok, out))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]
    seconds = rows[-1]["time"] - rows[args.warmup - 1]["time"]
    tokens = sum(r["tokens"] for r in rows[args.warmup:])
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
            "flops_per_token": summary["flops_per_token"], "peak_flops": summary["peak_flops"],
            "losses": [round(r["loss"], 3) for r in rows], "peak_rss_mb": peak_rss_mb()}


def run_trainer(args: argparse.Namespace, workdir: Path) -> dict:
    import numpy as np
    import torch
    from torch.utils.data import Dataset
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from protege.models import load_tokenizer
    from protege.precision import resolve_precision
    from protege.train.pretrain import measure_peak_flops, model_shape
    from protege.train.pretrain_data import PackedRows
    from protege.train.state import peak_rss_mb

    source, tok_dir = prepare(workdir, args.vocab)
    tok = load_tokenizer(tok_dir)
    data_dir = workdir / "data"
    if not (data_dir / "train.bin").exists():  # the protege side writes it; make it the same way if run alone
        from protege.train.pretrain import run

        run(_config(args, source, tok_dir, workdir / "protege-tokenize").model_copy(update={"max_steps": 1}))
    tokens = np.memmap(data_dir / "train.bin", dtype=json.loads((data_dir / "tokens.json").read_text())["dtype"], mode="r")
    T = args.length
    plan = PackedRows(len(tokens), T, 1, 1, seed=0)  # the same row order as protege's, one row per item

    class Rows(Dataset):
        def __len__(self) -> int:
            return len(plan)

        def __getitem__(self, i: int) -> dict:
            start = plan[i][0]
            ids = torch.from_numpy(np.asarray(tokens[start:start + T], dtype=np.int64))
            return {"input_ids": ids, "labels": ids.clone()}

    cfg = _config(args, source, tok_dir, workdir / "unused")
    shape = model_shape(cfg, len(tok))
    torch.manual_seed(0)
    model = LlamaForCausalLM(shape.config(T, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            stamps.append(time.time())

    bf16 = args.precision == "bf16"
    targs = TrainingArguments(output_dir=str(workdir / "trainer"), per_device_train_batch_size=args.batch,
                              max_steps=args.warmup + args.steps, learning_rate=1e-3, lr_scheduler_type="constant",
                              weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, bf16=bf16,
                              use_cpu=True, logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
                              dataloader_num_workers=0, seed=0, disable_tqdm=True)
    Trainer(model=model, args=targs, train_dataset=Rows(), callbacks=[Clock()]).train()
    seconds = stamps[-1] - stamps[args.warmup - 1]
    device_peak = measure_peak_flops("cpu", resolve_precision(args.precision, "cpu").dtype)
    return {"tokens_per_s": args.steps * args.batch * T / seconds, "seconds": seconds, "tokens": args.steps * args.batch * T,
            "flops_per_token": shape.flops_per_token(T), "peak_flops": device_peak, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--size", default="3M", help="non-embedding parameters (protege's model_size)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--length", type=int, default=512, help="tokens per row")
    ap.add_argument("--batch", type=int, default=8, help="rows per step")
    ap.add_argument("--only", choices=["protege", "trainer"])
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pretrain-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.only:
        fn = run_protege if args.only == "protege" else run_trainer
        print("RESULT " + json.dumps(fn(args, workdir)), flush=True)
        return
    import torch

    from protege.precision import cpu_bf16_units

    print(f"CPU bf16 units: {', '.join(cpu_bf16_units()) or 'none'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; model {args.size}, vocab {args.vocab}, {args.batch} x {args.length} "
          f"tokens per step, {args.precision}", flush=True)
    results = {}
    for side in ("protege", "trainer"):
        cmd = [sys.executable, __file__, "--only", side, "--workdir", str(workdir)] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("only", "workdir")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
        results[side] = r = json.loads(line[len("RESULT "):])
        mfu = r["tokens_per_s"] * r["flops_per_token"] / r["peak_flops"]
        print(f"{side:8s} {r['tokens_per_s']:9.0f} tokens/s  MFU {mfu:.3f}  ({r['tokens']} tokens in {r['seconds']:.1f} s; "
              f"peak {r['peak_flops'] / 1e12:.2f} TFLOP/s)  peak RSS {r['peak_rss_mb'] / 1024:.2f} GB", flush=True)
    ratio = results["protege"]["tokens_per_s"] / results["trainer"]["tokens_per_s"]
    print(f"ratio protege/HF Trainer tokens/s at {args.precision}: {ratio:.2f}x (goal >= 1.5x)")


if __name__ == "__main__":
    main()
