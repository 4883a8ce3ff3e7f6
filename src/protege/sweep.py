"""`protege sweep`: the False Promise experiment in one command.

Train the same student on N ∈ sizes imitation examples (nested samples of one
pool), evaluate every point with the same benchmarks (substance) and the same
judge against the teacher (style), and plot both against N on one figure.
Gudibande et al. (2023) found style climbs with N while substance stays near the
base model; this reproduces the measurement at laptop scale.

The sweep is compiled into an ordinary recipe (`sample-N`, `sft-N`, `bench-N`,
`answers-N`, `judge-N` stages) and run by the recipe runner, so finished points
are skipped and a killed sweep resumes.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from pydantic import Field

from .config import MaxNewTokens, StageConfig
from .figures import png_base64, pyplot
from .models import DEFAULT_JUDGE
from .pipeline import Recipe, StageSpec, run_recipe
from .teachers import TeacherConfig

__all__ = ["SweepConfig", "build_recipe", "run"]


class SweepConfig(StageConfig):
    name: str = Field("false-promise", description="run name: outputs go to <runs_dir>/<name>/")
    runs_dir: str = Field("runs", description="parent folder of runs")
    pool: str = Field(..., description="imitation data (conversation records) to sample the N examples from")
    sizes: list[int] = Field(default_factory=lambda: [0, 50, 100, 200, 400],
                             description="numbers of imitation examples; 0 is the untouched base model")
    student: str = Field("gemma-3-270m", description="base model that is fine-tuned at every point")
    teacher: str = Field("smollm2-135m-instruct", description="model whose answers the judge compares against")
    prompts: str = Field("recipes/data/judge_prompts.jsonl", description="held-out prompts answered and judged")
    judge: TeacherConfig = Field(default_factory=lambda: TeacherConfig(model=DEFAULT_JUDGE),
                                 description="the judge (any teacher backend); default: the built-in calibrated judge")
    tasks: list[str] | None = Field(None, description="benchmark tasks (default: protege's built-in tasks)")
    bench_limit: int | None = Field(None, description="items per benchmark task (None: all)")
    answer_max_new_tokens: MaxNewTokens = Field(128, description="answer budget per judged prompt")
    judge_limit: int | None = Field(None, description="judge at most this many prompts per point")
    judge_calibration: int = Field(24, description="known-better calibration pairs per judge run (a built-in "
                                   "judge's are cached, so only the first point pays for them)")
    sft: dict[str, Any] = Field(default_factory=dict, description="SFT options for every point (see `protege train sft --help`)")
    seed: int = Field(0, description="sampling seed; the N examples of a smaller point are a prefix of a larger point's")
    out_dir: str = Field("", description="set by the runner when used as a recipe stage (unused otherwise)")


def _label(n: int) -> str:
    return "base" if n == 0 else f"n={n}"


def build_recipe(cfg: SweepConfig) -> Recipe:
    """The sweep as a plain recipe (exposed so users can inspect or edit it)."""
    bench_extra = {k: v for k, v in (("tasks", cfg.tasks), ("limit", cfg.bench_limit)) if v is not None}
    stages: list[dict[str, Any]] = [
        {"name": "answers-teacher", "kind": "eval.answer",
         "config": {"model": cfg.teacher, "model_name": "teacher", "prompts": cfg.prompts,
                    "max_new_tokens": cfg.answer_max_new_tokens}},
    ]
    for n in sorted(set(cfg.sizes)):
        label = _label(n)
        tag = f"{n:05d}"
        if n == 0:
            model = cfg.student
        else:
            stages.append({"name": f"sample-{tag}", "kind": "data.sample",
                           "config": {"src": cfg.pool, "n": n, "seed": cfg.seed}})
            stages.append({"name": f"sft-{tag}", "kind": "train.sft",
                           "config": {**cfg.sft, "model": cfg.student, "datasets": [f"${{sample-{tag}}}/records.jsonl"],
                                      "save_merged": True}})
            model = f"${{sft-{tag}}}/merged"
        stages.append({"name": f"bench-{tag}", "kind": "eval.bench",
                       "config": {"model": model, "model_name": label, **bench_extra}})
        stages.append({"name": f"answers-{tag}", "kind": "eval.answer",
                       "config": {"model": model, "model_name": label, "prompts": cfg.prompts,
                                  "max_new_tokens": cfg.answer_max_new_tokens,
                                  "teacher_answers": "${answers-teacher}/answers.jsonl"}})
        stages.append({"name": f"judge-{tag}", "kind": "eval.judge",
                       "config": {"answers": [f"${{answers-{tag}}}", "${answers-teacher}"],
                                  "judge": cfg.judge.model_dump(mode="json"), "calibration": cfg.judge_calibration,
                                  **({"limit": cfg.judge_limit} if cfg.judge_limit else {})}})
    stages.append({"name": "bench-teacher", "kind": "eval.bench",
                   "config": {"model": cfg.teacher, "model_name": "teacher", **bench_extra}})
    return Recipe(name=cfg.name, runs_dir=cfg.runs_dir, description="False Promise sweep",
                  stages=[StageSpec(**s) for s in stages])


def _points(run_dir: Path, sizes: list[int]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Style and substance per N, read back from the stage folders through the report's own table."""
    from .report import collect, model_table

    table = model_table(collect([str(run_dir)]), base="base", teacher="teacher")
    by_model = {r["model"]: r for r in table["rows"]}
    points = []
    for n in sorted(set(sizes)):
        row = by_model.get(_label(n))
        if row is None:
            continue
        judged = row["judge"] or {}
        nll = row.get("teacher_nll") or {}
        plain = row["plain_scores"]
        points.append({"n": n, "model": row["model"], "judge_win_rate": judged.get("win_rate"),
                       "judge_ci": judged.get("ci"), "judge_trusted": judged.get("trusted"),
                       "teacher_nll": nll.get("nll"), "teacher_nll_ci": nll.get("nll_ci"),
                       "substance": row["substance"], "substance_ci": row["substance_ci"],
                       "prompt_style": row["prompt_style"],
                       "substance_plain": sum(plain.values()) / len(plain) if plain else None,
                       "scores": row["scores"], "mean_length": row["mean_length"],
                       "stop_rate": row["stop_rate"], "style_measures": row["style_measures"]})
    return points, by_model.get("teacher")


def _figure(points: list[dict[str, Any]], teacher: dict[str, Any] | None) -> str:
    plt = pyplot()

    ns = [p["n"] for p in points]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    nll = [p for p in points if p["teacher_nll"] is not None]
    if nll:
        ax1.errorbar([p["n"] for p in nll], [p["teacher_nll"] for p in nll],
                     yerr=[[p["teacher_nll"] - p["teacher_nll_ci"][0] for p in nll],
                           [p["teacher_nll_ci"][1] - p["teacher_nll"] for p in nll]],
                     fmt="o-", color="tab:orange", capsize=3, label="teacher-answer NLL (lower = more teacher-like)")
    ax1.set_xlabel("imitation examples (N)")
    ax1.set_ylabel("nats per token of the teacher's held-out answers")
    ax1.set_title("Style: how teacher-like (judge-free)")
    ax1.grid(alpha=0.3)
    judged = [p for p in points if p["judge_win_rate"] is not None]
    if judged:
        tw = ax1.twinx()
        trusted = all(p["judge_trusted"] is not False for p in judged)
        tw.plot([p["n"] for p in judged], [p["judge_win_rate"] for p in judged], "^" + ("-" if trusted else ":"),
                color="tab:red", alpha=1 if trusted else 0.5,
                label="judge win rate vs teacher" + ("" if trusted else " (judge NOT trustworthy)"))
        tw.set_ylim(0, 1)
        tw.set_ylabel("judge win rate")
        tw.legend(fontsize=7, loc="upper right")
    ax1.legend(fontsize=7, loc="lower left")
    ax2.errorbar(ns, [p["substance"] for p in points],
                 yerr=[[p["substance"] - p["substance_ci"][0] for p in points],
                       [p["substance_ci"][1] - p["substance"] for p in points]],
                 fmt="s-", color="tab:blue", capsize=3, label="mean benchmark score (own prompt style), 95% CI")
    plain = [p for p in points if p["substance_plain"] is not None]
    if plain:
        ax2.plot([p["n"] for p in plain], [p["substance_plain"] for p in plain], "s--", color="tab:cyan",
                 label="plain prompting (same as the base)")
    if teacher is not None and not math.isnan(teacher["substance"]):
        ax2.axhline(teacher["substance"], color="tab:blue", ls="--", lw=1, label="teacher")
    ax2.set_xlabel("imitation examples (N)")
    ax2.set_ylim(0, 1)
    ax2.set_title("Substance: what it knows")
    ax2.legend(fontsize=7, loc="best")
    ax2.grid(alpha=0.3)
    fig.suptitle("The False Promise: style vs substance as imitation data grows")
    data = png_base64(fig)
    return data


def _fmt(x: Any, ci: Any = None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    out = f"{x:.{digits}f}"
    return out + (f" [{ci[0]:.{digits - 1}f}, {ci[1]:.{digits - 1}f}]" if ci else "")


def _html(cfg: SweepConfig, points: list[dict[str, Any]], teacher: dict[str, Any] | None, figure: str) -> str:
    tasks = sorted({t for p in points for t in p["scores"]})
    head = "".join(f"<th>{html.escape(t)}</th>" for t in tasks)
    rows = []
    for p in points:
        cells = "".join(f"<td>{_fmt(p['scores'].get(t))}</td>" for t in tasks)
        flag = " (not trustworthy)" if p["judge_trusted"] is False else ""
        rows.append(f"<tr><td>{html.escape(str(p['n']))}</td><td>{_fmt(p['teacher_nll'], p['teacher_nll_ci'])}</td>"
                    f"<td>{_fmt(p['judge_win_rate'], p['judge_ci'])}{flag}</td><td>{_fmt(p['stop_rate'])}</td>"
                    f"<td>{_fmt(p['substance'], p['substance_ci'])}</td><td>{_fmt(p['substance_plain'])}</td>"
                    f"<td>{p['mean_length']:.0f}</td>{cells}</tr>")
    if teacher:
        cells = "".join(f"<td>{_fmt(teacher['scores'].get(t))}</td>" for t in tasks)
        rows.append(f"<tr><td>teacher</td><td>–</td><td>–</td><td>{_fmt(teacher['stop_rate'])}</td>"
                    f"<td>{_fmt(teacher['substance'], teacher['substance_ci'])}</td><td>–</td>"
                    f"<td>{teacher['mean_length']:.0f}</td>{cells}</tr>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(cfg.name)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
            f"<h1>False Promise sweep: {html.escape(cfg.student)} imitating {html.escape(cfg.teacher)}</h1>"
            f"<img alt='style and substance vs N' src='data:image/png;base64,{figure}'>"
            "<table id='sweep'><tr><th>N</th><th>teacher-answer NLL [95% CI]</th><th>judge win rate vs teacher</th>"
            "<th>stop rate</th><th>substance [95% CI]</th><th>substance, plain prompting</th>"
            f"<th>mean answer chars</th>{head}</tr>{''.join(rows)}</table></body></html>")


def _strip(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """A report row without its per-item score tables (kept in the bench folders)."""
    return None if row is None else {k: v for k, v in row.items() if k not in ("items", "plain_items", "teacher_nll")}


def run(cfg: SweepConfig) -> dict[str, Any]:
    """Run every point of the sweep (skipping finished ones), then write sweep.json / sweep.png / sweep.html."""
    recipe = build_recipe(cfg)
    run_recipe(recipe)
    run_dir = Path(cfg.runs_dir) / cfg.name
    points, teacher = _points(run_dir, cfg.sizes)
    figure = _figure(points, teacher)
    (run_dir / "sweep.png").write_bytes(base64.b64decode(figure))
    (run_dir / "sweep.json").write_text(json.dumps({"points": points, "teacher": _strip(teacher)}, indent=2, default=str))
    out = run_dir / "sweep.html"
    out.write_text(_html(cfg, points, teacher, figure), encoding="utf-8")
    return {"points": len(points), "html": str(out)}
