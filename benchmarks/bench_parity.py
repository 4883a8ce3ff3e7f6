"""Multiple-choice scoring: protege vs lm-evaluation-harness on the same checkpoint and items.

Both score the same questions with the same model object (an HF folder loaded once, float32):
- protege: `engine.loglik` (context encoded once per question, its KV cache shared by the options;
  questions on one passage batched together so the passage runs once; LM head only on scored positions);
- lm-eval: its `hf` model (`HFLM`) on a custom `multiple_choice` task built from the very same
  context strings and options, through `lm_eval.simple_evaluate`.

Prints per-item log-likelihood agreement, both accuracies (acc and acc_norm must be identical), both
wall times and the speed ratio (target: protege >= 3x faster). Timings on a shared machine are noisy,
so each side runs `--repeats` times, alternating, and the best time of each counts.

    python benchmarks/bench_parity.py                                   # smollm2-135m-instruct, built-in MC set
    python benchmarks/bench_parity.py --task agieval:path/to/agieval/lsat-rc.jsonl --fewshot 0 --limit 60
Needs `pip install lm-eval` (the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def protege_scores(model, tok, contexts, options, batch_size):
    """What `protege eval bench` does: encode every question, then `score_sorted` (batched by length)."""
    from protege.engine.loglik import encode_question, score_sorted

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    qs = [encode_question(tok, c, [" " + o for o in opts]) for c, opts in zip(contexts, options)]
    return [[ll for ll, _ in row] for row in score_sorted(model, qs, batch_size=batch_size, pad_id=pad)]


def lmeval_scores(lm, data_file, n, batch_size):
    from lm_eval import simple_evaluate

    task = {"task": "protege_parity", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data_file}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}", "target_delimiter": " ",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    lm.batch_size_per_gpu = batch_size
    res = simple_evaluate(model=lm, tasks=[task], batch_size=batch_size, log_samples=True, bootstrap_iters=0,
                          verbosity="ERROR")
    samples = sorted(res["samples"]["protege_parity"], key=lambda s: s["doc_id"])
    assert len(samples) == n, (len(samples), n)
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    metrics = res["results"]["protege_parity"]
    return lls, metrics["acc,none"], metrics["acc_norm,none"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="alias or HF folder")
    ap.add_argument("--task", default="world_knowledge", help="a multiple_choice task reference")
    ap.add_argument("--fewshot", type=int, default=5, help="solved examples in each context (MMLU uses 5)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8, help="the same for both")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for both (1 is steadiest on a shared machine; 0 = torch's default)")
    ap.add_argument("--tolerance", type=float, default=1e-3, help="max |Δ log-likelihood| per option")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="the model both sides score with (lm-eval's dtype=); in bfloat16 protege runs its LM head "
                         "in fp32 (`lm_head.fp32_head`), lm-eval takes the bf16 logits, so expect |Δ| ~ 1e-1")
    args = ap.parse_args()

    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        print("lm-evaluation-harness is not installed: pip install lm-eval (or pip install -e '.[bench]')")
        return 2
    import torch

    from protege.evaluate.metrics import mc_metrics
    from protege.evaluate.prompts import PromptBuilder
    from protege.tasks.spec import load_items, resolve_task, split_fewshot
    from protege.models import load, resolve

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = resolve_task(args.task)
    if spec.type != "multiple_choice":
        print(f"{args.task} is a {spec.type} task; parity needs multiple_choice")
        return 2
    k = spec.fewshot if args.fewshot is None else args.fewshot
    shots, items = split_fewshot(spec, load_items(spec), k)
    items = items[: args.limit] if args.limit else items
    path = resolve(args.model)
    model, tok = load(path, dtype=args.dtype, device="cpu")
    builder = PromptBuilder(spec, shots, chat=None)  # plain prompting: what lm-eval does by default
    contexts = [builder.context(it) for it in items]
    options = [builder.options(it)[1] for it in items]
    golds = [it["gold"] for it in items]
    tmp = Path(tempfile.mkdtemp(prefix="protege-parity-"))
    data_file = str(tmp / "items.jsonl")
    with open(data_file, "w", encoding="utf-8") as fh:
        for c, o, g in zip(contexts, options, golds):
            fh.write(json.dumps({"context": c, "choices": o, "gold": g}) + "\n")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, device="cpu")
    print(f"model {args.model} ({path}, {args.dtype}), task {spec.name}, {len(items)} items, {k}-shot, "
          f"batch size {args.batch_size}, torch threads {torch.get_num_threads()}", flush=True)

    t_protege, t_lmeval = [], []
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        ours = protege_scores(model, tok, contexts, options, args.batch_size)
        t_protege.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        theirs, lm_acc, lm_acc_norm = lmeval_scores(lm, data_file, len(items), args.batch_size)
        t_lmeval.append(time.perf_counter() - t0)
        print(f"  repeat {rep + 1}: protege {t_protege[-1]:.2f} s, lm-eval {t_lmeval[-1]:.2f} s", flush=True)

    diffs = [abs(a - b) for row_a, row_b in zip(ours, theirs) for a, b in zip(row_a, row_b)]
    metrics = [mc_metrics(row, opts, g) for row, opts, g in zip(ours, options, golds)]
    acc = sum(m["acc"] for m in metrics) / len(metrics)
    acc_norm = sum(m["acc_norm"] for m in metrics) / len(metrics)
    same_pred = sum(max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__)
                    for a, b in zip(ours, theirs))
    speedup = min(t_lmeval) / min(t_protege)
    figures = {"model": args.model, "task": spec.name, "items": len(items), "options": len(diffs),
               "max_abs_loglik_diff": max(diffs), "mean_abs_loglik_diff": sum(diffs) / len(diffs),
               "protege_acc": acc, "lmeval_acc": lm_acc, "protege_acc_norm": acc_norm, "lmeval_acc_norm": lm_acc_norm,
               "same_argmax": same_pred, "protege_seconds": min(t_protege), "lmeval_seconds": min(t_lmeval),
               "speedup": speedup, "dtype": args.dtype}
    print()
    print(f"{'':<12}{'acc':>8}{'acc_norm':>10}{'seconds':>10}")
    print(f"{'protege':<12}{acc:>8.4f}{acc_norm:>10.4f}{min(t_protege):>10.2f}")
    print(f"{'lm-eval':<12}{lm_acc:>8.4f}{lm_acc_norm:>10.4f}{min(t_lmeval):>10.2f}")
    print(f"per-option log-likelihood |Δ|: max {max(diffs):.2e}, mean {figures['mean_abs_loglik_diff']:.2e} "
          f"over {len(diffs)} options; same argmax on {same_pred}/{len(items)} items")
    print(f"speed: protege is {speedup:.2f}x faster than lm-eval (target >= 3x)")
    ok = max(diffs) <= args.tolerance and abs(acc - lm_acc) < 1e-9 and abs(acc_norm - lm_acc_norm) < 1e-9
    print("PARITY OK" if ok else "PARITY FAILED")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
