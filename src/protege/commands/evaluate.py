"""`protege eval bench|answer|judge` and `protege report`: parse arguments, call the library."""

from __future__ import annotations

import argparse
import json
from typing import Any

from . import Subparsers, add_stage_parser

ORDER = 60


def _load(args: argparse.Namespace, mapping: dict[str, str]) -> tuple[Any, Any]:
    """(config, run) of the command's stage; explicit flags become `key=value` overrides (YAML-parsed like any
    other override, so `--out X` and `--out_dir=X` are one setting)."""
    from ..config import load_config
    from ..stages import stage_kind

    config_cls, run = stage_kind(args.stage_kind)
    extra = [f"{key}={json.dumps(getattr(args, flag))}" for flag, key in mapping.items()
             if getattr(args, flag, None) is not None]
    return load_config(config_cls, args.config, extra + list(args.overrides or [])), run


def register(sub: Subparsers) -> None:
    ev = sub.add_parser("eval", help="evaluate models: benchmarks (substance), answers, LLM judge (style), reward model",
                        description="Evaluate models. Subcommands: bench, answer, judge, rm.")
    evsub = ev.add_subparsers(dest="eval_command", metavar="SUBCOMMAND")
    ev.set_defaults(func=lambda a: ev.print_help() or 0)

    b = add_stage_parser(evsub, "bench", "eval.bench", _bench,
                         help="score a model on benchmark tasks (MC log-likelihood, "
                         "generation exact match, classification + format adherence, text-to-SQL)")
    b.add_argument("--model", help="model alias, HF folder or .gguf")
    b.add_argument("--tasks", nargs="+", help="built-in task names, task YAMLs, agieval:FILE, bbh:FILE")
    b.add_argument("--out", "--out_dir", dest="out", help="output folder (the config's `out_dir`)")
    b.add_argument("--limit", type=int, help="items per task")

    a = add_stage_parser(evsub, "answer", "eval.answer", _answer,
                         help="answer a prompt set turn by turn (the judge's input)")
    a.add_argument("--model", help="model alias, HF folder or .gguf")
    a.add_argument("--prompts", help="prompt JSONL (MT-bench `turns`, protege `messages`, or `prompt`)")
    a.add_argument("--out", "--out_dir", dest="out", help="output folder (the config's `out_dir`)")
    a.add_argument("--limit", type=int, help="prompts to answer")

    j = add_stage_parser(evsub, "judge", "eval.judge", _judge,
                         help="LLM judge: pairwise (both orders), single or "
                         "reference-guided grading, with its position and length biases")
    j.add_argument("--answers", nargs="+", help="answer sets or model specs (pairwise: candidate, opponent)")
    j.add_argument("--prompts", help="prompt JSONL, when --answers names models")
    j.add_argument("--judge-model", help="judge model (alias/folder for local, API model name for openai)")
    j.add_argument("--mode", choices=["pairwise", "single", "reference"])
    j.add_argument("--out", "--out_dir", dest="out", help="output folder (the config's `out_dir`)")
    j.add_argument("--limit", type=int, help="prompts to judge")

    m = add_stage_parser(evsub, "rm", "eval.rm", _rm,
                         help="score answer sets with a reward model (from `train rm`)")
    m.add_argument("answers_pos", nargs="*", metavar="ANSWERS", help="answer sets (`eval answer` folders)")
    m.add_argument("--rm", help="reward model folder")
    m.add_argument("--out", "--out_dir", dest="out", help="output folder (the config's `out_dir`)")

    r = add_stage_parser(sub, "report", "report", _report,
                         help="one HTML page (+ report.md): style vs substance of "
                         "base, students and teacher, imitation gap, plots, judge consistency")
    r.add_argument("inputs_pos", nargs="*", metavar="DIR", help="bench/judge/answer/run folders")
    r.add_argument("-o", "--output", help="HTML file to write (report.md goes next to it)")
    r.add_argument("--base", help="name of the base model row")
    r.add_argument("--teacher", help="name of the teacher row")


def _bench(args: argparse.Namespace) -> int:
    cfg, run = _load(args, {"model": "model", "tasks": "tasks", "out": "out_dir", "limit": "limit"})
    for task, r in run(cfg).items():
        print(f"{task:<28} {r['metric']:<20} {r['score']:.4f}  (n={r['n']})")
    print(f"results: {cfg.out_dir}/results.json")
    return 0


def _answer(args: argparse.Namespace) -> int:
    cfg, run = _load(args, {"model": "model", "prompts": "prompts", "out": "out_dir", "limit": "limit"})
    r = run(cfg)
    rate = "–" if r["stop_rate"] is None else f"{r['stop_rate']:.3f}"
    print(f"{r['model']}: {r['prompts']} prompts, {r['turns']} turns answered; {r['stopped']} ended their turn, "
          f"{r['cut_at_max_tokens']} cut at max_new_tokens (stop rate {rate}) -> {cfg.out_dir}/answers.jsonl")
    return 0


def _judge(args: argparse.Namespace) -> int:
    cfg, run = _load(args, {"answers": "answers", "prompts": "prompts", "judge_model": "judge.model", "mode": "mode",
                            "out": "out_dir", "limit": "limit"})
    r = run(cfg)
    s = r["summary"]
    if r["mode"] == "pairwise":
        a, b = r["models"]
        print(f"{a} vs {b} (judge {r['judge']}, {s['n_judged']}/{s['n']} judged)")
        for k in ("win", "tie", "loss"):
            lo, hi = s[f"{k}_ci"]
            print(f"  {k:<5} {s[k]:.3f}  [{lo:.3f}, {hi:.3f}]")
        print(f"  win rate (ties half) {s['win_rate']:.3f}; position consistency {s['position_consistency']:.3f}; "
              f"first-position rate {s['first_position_rate']:.3f}; longer answer wins {s['length_bias']:.3f}; "
              f"judge errors {s['error_rate']:.3f}")
        if "lc_win_rate" in s:
            lo, hi = s["lc_win_rate_ci"]
            raw = s.get("lc_raw_win_rate")
            print(f"  length-controlled win rate {s['lc_win_rate']:.3f} [{lo:.3f}, {hi:.3f}] (AlpacaEval 2's GLM; "
                  f"length coefficient {s['length_coef']:+.2f}"
                  + (f"; {raw:.3f} on the same targets without the length term" if raw is not None else "") + ")")
    else:
        for name, m in s.items():
            lo, hi = m["mean_rating_ci"]
            print(f"{name:<28} rating {m['mean_rating']:.2f} [{lo:.2f}, {hi:.2f}]  errors {m['error_rate']:.3f}  "
                  f"length~rating r={m['length_rating_corr']:.2f}")
            turns = {k: v for k, v in (m.get("per_turn") or {}).items() if k != "0"}
            if turns:
                print("  per turn: " + ", ".join(f"turn {k} {v['mean']:.2f} (n={v['n']})" for k, v in turns.items()))
            cats = m.get("per_category") or {}
            if len(cats) > 1:
                print("  per category: " + ", ".join(f"{k or '-'} {v['mean']:.2f}" for k, v in cats.items()))
    print(f"results: {cfg.out_dir}/judge_results.json")
    return 0


def _rm(args: argparse.Namespace) -> int:
    if args.answers_pos:
        args.answers = args.answers_pos
    cfg, run = _load(args, {"answers": "answers", "rm": "rm", "out": "out_dir"})
    for name, mean in run(cfg).items():
        print(f"{name:<28} mean reward {mean:.4f}")
    print(f"scores: {cfg.out_dir}/<model>/rm_scores.json")
    return 0


def _report(args: argparse.Namespace) -> int:
    if args.inputs_pos:
        args.inputs = args.inputs_pos
    cfg, run = _load(args, {"inputs": "inputs", "output": "output", "base": "base", "teacher": "teacher"})
    r = run(cfg)
    print(f"report: {r['html']} (and {r['markdown']}); {r['models']} models")
    return 0
