"""Which built-in judge can be trusted? Each candidate judges the same known-better calibration pairs
(both orders) and we report accuracy (ties half) with its 95% interval, position consistency, accuracy
per corruption kind, and seconds per verdict (one verdict = one order of one pair).

    python benchmarks/judge_candidates.py [--pairs 48] [--judges smollm2-135m-instruct:logprob,...]

A candidate passes with the same thresholds `eval judge` uses (accuracy >= 0.75, its interval's low end
> 0.5, position consistency >= 0.5). There is no peer tool here, so no ratio: the comparison is between
judges, on one machine, in one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

DEFAULT = ("smollm2-135m-instruct:generate,smollm2-135m-instruct:logprob,"
           "qwen2.5-coder-0.5b-instruct:logprob,qwen2.5-coder-1.5b-instruct:logprob")


def main() -> int:
    from protege.evaluate import judge
    from protege.evaluate.calibration import calibration_summary, trust_verdict
    from protege.teachers import TeacherConfig, make_teacher

    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--judges", default=DEFAULT, help="comma-separated MODEL:logprob|generate")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    results = []
    for entry in args.judges.split(","):
        model, _, how = entry.partition(":")
        cfg = judge.JudgeConfig(answers=["-", "-"], judge=TeacherConfig(model=model, max_batch_size=8),
                                calibration=args.pairs, verdicts=how or "auto", max_new_tokens=48)
        with tempfile.TemporaryDirectory() as tmp:  # no cache: every verdict is computed and timed
            teacher = make_teacher(cfg.judge, cache_dir=tmp)
            t_load = time.perf_counter()
            _ = teacher.engine
            t_load = time.perf_counter() - t_load
            t0 = time.perf_counter()
            rows = judge._run_calibration(teacher, cfg, how == "logprob")
            secs = time.perf_counter() - t0
            teacher.close()
        s = calibration_summary(rows)
        t = trust_verdict(s, cfg.min_calibration_accuracy, cfg.min_position_consistency)
        r = {"judge": model, "verdicts": how, "pairs": len(rows), "accuracy": s["accuracy"], "ci": s["accuracy_ci"],
             "position_consistency": s["position_consistency"], "error_rate": s["error_rate"],
             "by_kind": {k: round(v["accuracy"], 3) for k, v in s["by_kind"].items()},
             "seconds_per_verdict": secs / (2 * len(rows)), "load_seconds": t_load, "passes": t["trustworthy"],
             "reasons": t["reasons"]}
        results.append(r)
        print(f"{model:<30} {how:<8} accuracy {r['accuracy']:.3f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]  "
              f"consistency {r['position_consistency']:.3f}  errors {r['error_rate']:.2f}  "
              f"{r['seconds_per_verdict']:.3f} s/verdict  load {t_load:.1f} s  "
              f"{'PASSES' if r['passes'] else 'fails: ' + '; '.join(r['reasons'])}", flush=True)
        print("    by kind: " + ", ".join(f"{k} {v:.2f}" for k, v in r["by_kind"].items()), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
