"""Sharded SFT on this CPU: DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 through accelerate, two processes, one run.

    python benchmarks/sharded_sft.py [--steps 6] [--warmup 1] [--configs ddp fsdp2 zero2 zero3]

Each config is the shipped `recipes/accelerate/<name>.yaml`, launched as a user would (`accelerate launch
--num_processes 2 --mixed_precision bf16 -m protege.cli train sft`), on smollm2-135m-instruct with LoRA r=16
on every linear layer, the synthetic chats of `sft_throughput.py`, max length 256, batch 2 per process, one
torch thread per process (two cores). Throughput counts real tokens per second over the steps after warm-up;
the loss curves are printed so that equal work can be seen. What it measures is what sharding costs where it
cannot pay off (two processes, one machine, a model that fits): the GPU figures are gpu_check.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_throughput import synthetic_chats  # noqa: E402

MODEL = "smollm2-135m-instruct"


def run(name: str, data: Path, workdir: Path, steps: int, warmup: int) -> dict:
    out = workdir / name
    cmd = ["accelerate", "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / f"{name}.yaml"),
           "--num_processes", "2", "--mixed_precision", "bf16", "-m", "protege.cli", "train", "sft",
           f"--model={MODEL}", f"--datasets=[{data}]", "--max_length=256", "--batch_size=2",
           f"--max_steps={warmup + steps}", "--eval_fraction=0.0", "--save_every=0", "--tensorboard=false",
           "--lora.r=16", "--lora.alpha=32", "--lora.target_modules=all-linear", "--precision=bf16",
           f"--out_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr[-1500:]}
    rows = [json.loads(x) for x in open(out / "metrics.jsonl") if '"loss"' in x]
    timed = rows[warmup:]
    seconds = timed[-1]["time"] - rows[warmup - 1]["time"] if warmup else timed[-1]["time"] - t0
    tokens = sum(r["tokens"] for r in timed)
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": round(seconds, 2),
            "wall_s": round(time.time() - t0, 1), "losses": [round(r["loss"], 4) for r in rows]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps (after warm-up)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    ap.add_argument("--configs", nargs="+", default=["ddp", "fsdp2", "zero2", "zero3"],
                    choices=["ddp", "fsdp2", "zero2", "zero3"])
    ap.add_argument("--conversations", type=int, default=96)
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sharded-sft-"))
    data = workdir / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in synthetic_chats(args.conversations)))
    results = {}
    for name in args.configs:
        results[name] = r = run(name, data, workdir, args.steps, max(args.warmup, 1))
        if "error" in r:
            print(f"{name:6s} failed:\n{r['error']}", flush=True)
            continue
        print(f"{name:6s} {r['tokens_per_s']:8.1f} tok/s  ({r['tokens']} tokens in {r['seconds']} s; wall "
              f"{r['wall_s']} s)  losses {r['losses']}", flush=True)
    base = results.get("ddp", {}).get("tokens_per_s")
    for name, r in results.items():
        if base and name != "ddp" and "tokens_per_s" in r:
            print(f"{name} / ddp tokens/s ratio: {r['tokens_per_s'] / base:.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
