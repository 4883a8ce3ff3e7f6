"""SFT throughput on a CPU: protege vs TRL's SFTTrainer, same model, data, LoRA and batch, in one run.

    python benchmarks/sft_throughput.py [--steps 4] [--warmup 1] [--precision bf16] [--only protege|trl]

gemma-3-270m, synthetic chats with about half of the tokens in the answers, LoRA r=16 on
every linear layer, max length 256, batch 4. TRL gets prompt/completion pairs (its
completion-only loss), protege the same conversations (assistant-only loss, packing on).
Three runs, each in its own subprocess so its peak RSS is its own: protege fp32, protege at
`--precision` and TRL at `--precision` (bf16: the model loaded in bf16 and `bf16=True`, as a TRL
user would write it; fp32: TRL as before). Throughput counts real (non-padding) tokens per second
over the steps after warm-up. Timings on a shared machine are noisy; the ratios, measured in one
run, are what to compare. The CPU's bf16 units are printed first: absolute numbers differ by machine.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "gemma-3-270m"
WORDS = ("model data train answer question explain simple step reason because language small large fast slow "
         "water light energy city river mountain number value result method system example idea clear").split()


def synthetic_chats(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """User turns and answers of similar length (~60 tokens each): ~50% of tokens are learned."""
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        q = " ".join(rng.choices(WORDS, k=rng.randint(35, 60))) + "?"
        a = " ".join(rng.choices(WORDS, k=rng.randint(35, 60))) + "."
        chats.append([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    return chats


def run_protege(workdir: Path, data: Path, steps: int, warmup: int, precision: str) -> dict:
    from protege.train.state import peak_rss_mb
    from protege.train.sft import SFTConfig, run

    config = SFTConfig(model=MODEL, datasets=[str(data)], out_dir=str(workdir / f"protege-{precision}"), max_length=256,
                       batch_size=4, max_steps=warmup + steps, eval_fraction=0.0, save_every=0, tensorboard=False,
                       lora={"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
                       resume="no", precision=precision)
    run(config)
    rows = [json.loads(l) for l in open(workdir / f"protege-{precision}" / "metrics.jsonl") if '"loss"' in l]
    timed = rows[warmup:]
    seconds = timed[-1]["time"] - rows[warmup - 1]["time"] if warmup else None
    tokens = sum(r["tokens"] for r in timed)
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds, "peak_rss_mb": peak_rss_mb(),
            "losses": [round(r["loss"], 4) for r in rows]}


def run_trl(workdir: Path, data: Path, steps: int, warmup: int, precision: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from protege.chat import ChatFormat
    from protege.models import load
    from protege.train.state import peak_rss_mb

    bf16 = precision == "bf16"
    model, tok = load(MODEL, dtype="bfloat16" if bf16 else "float32", device="cpu")
    chat = ChatFormat.from_tokenizer(tok)
    rows = []
    for line in open(data):
        msgs = json.loads(line)["messages"]
        prompt = chat.render(msgs[:1], add_generation_prompt=True)
        rows.append({"prompt": prompt, "completion": chat.render(msgs)[len(prompt):]})
    lengths = [len(tok(r["prompt"] + r["completion"], add_special_tokens=False)["input_ids"]) for r in rows]
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.time())

    args = SFTConfig(output_dir=str(workdir / "trl"), max_length=256, per_device_train_batch_size=4,
                     gradient_accumulation_steps=1, max_steps=warmup + steps, learning_rate=2e-4,
                     completion_only_loss=True, packing=False, logging_steps=1, save_strategy="no", report_to=[],
                     use_cpu=True, dataset_kwargs={"add_special_tokens": False}, seed=0, bf16=bf16)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora, callbacks=[Clock()])
    torch.manual_seed(0)
    trainer.train()
    seconds = stamps[-1] - stamps[warmup - 1]
    tokens = steps * 4 * sum(lengths) / len(lengths)  # TRL does not pack: 4 examples per step, mean length
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps (after warm-up)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--only", choices=["protege", "trl"], help="run one side (in this process)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16", help="protege's second run and TRL's")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--conversations", type=int, default=96)
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sft-bench-"))
    data = workdir / "chats.jsonl"
    if not data.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        with data.open("w") as fh:
            for msgs in synthetic_chats(args.conversations):
                fh.write(json.dumps({"messages": msgs}) + "\n")
    if args.only:
        fn = run_protege if args.only == "protege" else run_trl
        print("RESULT " + json.dumps(fn(workdir, data, args.steps, args.warmup, args.precision)), flush=True)
        return
    from protege.precision import cpu_bf16_units

    import torch

    print(f"CPU bf16 units: {', '.join(cpu_bf16_units()) or 'none'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    results = {}
    runs = [("protege", "fp32"), ("protege", args.precision), ("trl", args.precision)]
    for side, precision in dict.fromkeys(runs):
        cmd = [sys.executable, __file__, "--only", side, "--workdir", str(workdir), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--precision", precision]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{side} {precision} failed:\n{proc.stderr[-3000:]}")
        results[side, precision] = r = json.loads(line[len("RESULT "):])
        print(f"{side:8s} {precision}  {r['tokens_per_s']:8.1f} tokens/s  ({r['tokens']:.0f} tokens in "
              f"{r['seconds']:.1f} s)  peak RSS {r['peak_rss_mb'] / 1024:.2f} GB", flush=True)
    ours, base, peer = results["protege", args.precision], results["protege", "fp32"], results["trl", args.precision]
    if args.precision != "fp32":
        print(f"ratio protege {args.precision}/fp32: {ours['tokens_per_s'] / base['tokens_per_s']:.2f}x  "
              f"(goal >= 2x); peak RSS {ours['peak_rss_mb'] / base['peak_rss_mb']:.2f} of fp32's (goal <= 0.6)")
    print(f"ratio protege/TRL at {args.precision}: {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x  "
          f"(goal >= 2.5x in bf16; protege peak RSS {ours['peak_rss_mb'] / 1024:.2f} GB)")


if __name__ == "__main__":
    main()
