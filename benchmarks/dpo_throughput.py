"""DPO throughput on a CPU: protege `train dpo` vs TRL's DPOTrainer, same model, pairs and LoRA, in one run.

    python benchmarks/dpo_throughput.py [--pairs 32] [--batch 4] [--precision fp32|bf16] [--only protege|trl]

gemma-3-270m, synthetic pairs (prompt ~100 tokens, answers ~150 tokens each), LoRA r=16 on every
linear layer, max length 512, one epoch. Both sides compute the reference log-probs once per pair
with the adapters disabled: protege before training (cached; the time is included here, the cache
is cleared first), TRL inside each step (its default, precompute_ref_log_probs=False). Throughput is
pairs per second over the whole run (model load excluded). Each side runs in its own subprocess so
its peak RSS is its own. `--precision bf16` (default fp32): protege `precision: bf16`; TRL with the model
loaded in bf16 and `bf16=True`, as a TRL user would write it.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "gemma-3-270m"
WORDS = ("model data train answer question explain simple step reason because language small large fast slow "
         "water light energy city river mountain number value result method system example idea clear").split()


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.choices(WORDS, k=rng.randint(85, 110))) + "?",
             "chosen": " ".join(rng.choices(WORDS, k=rng.randint(130, 165))) + ".",
             "rejected": " ".join(rng.choices(WORDS, k=rng.randint(130, 165))) + "."} for _ in range(n)]


def run_protege(workdir: Path, data: Path, batch: int, precision: str) -> dict:
    from protege.train.dpo import DPOConfig, run
    from protege.train.state import peak_rss_mb

    shutil.rmtree(workdir / "refcache", ignore_errors=True)
    config = DPOConfig(model=MODEL, datasets=[str(data)], out_dir=str(workdir / "protege"), max_length=512,
                       batch_size=batch, epochs=1, eval_fraction=0.0, save_every=0, tensorboard=False, resume="no",
                       lora={"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear",
                             "trainable_tokens": "none"}, reference_cache=str(workdir / "refcache"),
                       precision=precision)
    t0 = time.time()
    summary = run(config)
    seconds = time.time() - t0  # includes the model load; reported separately below
    return {"pairs": summary["pairs"], "seconds": seconds, "peak_rss_mb": peak_rss_mb(),
            "losses": [round(json.loads(l)["loss"], 4) for l in open(workdir / "protege" / "metrics.jsonl") if '"loss"' in l]}


def run_trl(workdir: Path, data: Path, batch: int, precision: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from protege.chat import ChatFormat
    from protege.models import load
    from protege.train.state import peak_rss_mb

    t0 = time.time()
    bf16 = precision == "bf16"
    model, tok = load(MODEL, dtype="bfloat16" if bf16 else "float32", device="cpu")
    chat = ChatFormat.from_tokenizer(tok)
    rows = []
    for line in open(data):
        r = json.loads(line)
        prompt = [{"role": "user", "content": r["prompt"]}]
        p = chat.render(prompt, add_generation_prompt=True)
        rows.append({"prompt": p, **{k: chat.render(prompt + [{"role": "assistant", "content": r[k]}])[len(p):]
                                     for k in ("chosen", "rejected")}})
    args = DPOConfig(output_dir=str(workdir / "trl"), max_length=512, per_device_train_batch_size=batch,
                     num_train_epochs=1, learning_rate=5e-5, logging_steps=1, save_strategy="no", report_to=[],
                     use_cpu=True, bf16=bf16, seed=0, beta=0.1)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora)
    torch.manual_seed(0)
    trainer.train()
    return {"pairs": len(rows), "seconds": time.time() - t0, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--only", choices=["protege", "trl"], help="run one side (in this process)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="both sides")
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dpo-bench-"))
    data = workdir / "pairs.jsonl"
    if not data.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps(p) + "\n" for p in synthetic_pairs(args.pairs)))
    if args.only:
        fn = run_protege if args.only == "protege" else run_trl
        print("RESULT " + json.dumps(fn(workdir, data, args.batch, args.precision)), flush=True)
        return
    results = {}
    for side in ("protege", "trl"):
        cmd = [sys.executable, __file__, "--only", side, "--workdir", str(workdir), "--batch", str(args.batch),
               "--precision", args.precision]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
        r = results[side] = json.loads(line[len("RESULT "):])
        print(f"{side:8s} {r['pairs'] / r['seconds']:7.3f} pairs/s  ({r['pairs']} pairs in {r['seconds']:.1f} s, "
              f"model load included)  peak RSS {r['peak_rss_mb'] / 1024:.2f} GB", flush=True)
    ratio = (results["protege"]["pairs"] / results["protege"]["seconds"]) / (results["trl"]["pairs"] / results["trl"]["seconds"])
    print(f"ratio protege/TRL at {args.precision}: {ratio:.2f}x pairs/s  (goal >= 5x; protege peak RSS "
          f"{results['protege']['peak_rss_mb'] / 1024:.2f} GB, goal <= 8 GB; reference log-probs: protege "
          "precomputed once per pair and cached, TRL computed per step, both with adapters disabled)")


if __name__ == "__main__":
    main()
