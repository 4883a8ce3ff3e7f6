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
import io
import json
import math
from pathlib import Path
from typing import Any

from pydantic import Field

from .config import StageConfig
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
    judge: TeacherConfig = Field(default_factory=TeacherConfig, description="the judge (any teacher backend)")
    tasks: list[str] | None = Field(None, description="benchmark tasks (default: protege's built-in tasks)")
    bench_limit: int | None = Field(None, description="items per benchmark task (None: all)")
    answer_max_new_tokens: int = Field(128, description="answer budget per judged prompt")
    judge_limit: int | None = Field(None, description="judge at most this many prompts per point")
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
                                  "max_new_tokens": cfg.answer_max_new_tokens}})
        stages.append({"name": f"judge-{tag}", "kind": "eval.judge",
                       "config": {"answers": [f"${{answers-{tag}}}", "${answers-teacher}"],
                                  "judge": cfg.judge.model_dump(mode="json"),
                                  **({"limit": cfg.judge_limit} if cfg.judge_limit else {})}})
    stages.append({"name": "bench-teacher", "kind": "eval.bench",
                   "config": {"model": cfg.teacher, "model_name": "teacher", **bench_extra}})
    return Recipe(name=cfg.name, runs_dir=cfg.runs_dir, description="False Promise sweep",
                  stages=[StageSpec(**s) for s in stages])


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _points(run_dir: Path, sizes: list[int]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Style and substance per N, read back from the stage folders through the report's own table."""
    from .evaluate.report import collect, model_table

    table = model_table(collect([str(run_dir)]), base="base", teacher="teacher")
    by_model = {r["model"]: r for r in table["rows"]}
    points = []
    for n in sorted(set(sizes)):
        row = by_model.get(_label(n))
        if row is None:
            continue
        judged = row["judge"] or {}
        points.append({"n": n, "model": row["model"], "style": row["style"], "style_ci": judged.get("ci"),
                       "substance": row["substance"], "scores": row["scores"], "mean_length": row["mean_length"]})
    return points, by_model.get("teacher")


def _figure(points: list[dict[str, Any]], teacher: dict[str, Any] | None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [p["n"] for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(ns, [p["style"] for p in points], "o-", color="tab:orange", label="style: judge win rate vs teacher")
    lo = [p["style_ci"][0] if p["style_ci"] else p["style"] for p in points]
    hi = [p["style_ci"][1] if p["style_ci"] else p["style"] for p in points]
    ax.fill_between(ns, lo, hi, color="tab:orange", alpha=0.15)
    ax.plot(ns, [p["substance"] for p in points], "s-", color="tab:blue", label="substance: mean benchmark score")
    if teacher is not None and not math.isnan(teacher["substance"]):
        ax.axhline(teacher["substance"], color="tab:blue", ls="--", lw=1, label="teacher substance")
    ax.axhline(0.5, color="tab:orange", ls=":", lw=1, label="parity with teacher (style)")
    ax.set_xlabel("imitation examples (N)")
    ax.set_ylim(0, 1)
    ax.set_title("The False Promise: style vs substance as imitation data grows")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    data = _png(fig)
    plt.close(fig)
    return data


def _html(cfg: SweepConfig, points: list[dict[str, Any]], teacher: dict[str, Any] | None, figure: str) -> str:
    tasks = sorted({t for p in points for t in p["scores"]})
    head = "".join(f"<th>{html.escape(t)}</th>" for t in tasks)
    rows = []
    for p in points + ([{"n": "teacher", **teacher, "style": float("nan")}] if teacher else []):
        cells = "".join(f"<td>{p['scores'].get(t, float('nan')):.3f}</td>" for t in tasks)
        rows.append(f"<tr><td>{html.escape(str(p['n']))}</td><td>{p['style']:.3f}</td><td>{p['substance']:.3f}</td>"
                    f"<td>{p['mean_length']:.0f}</td>{cells}</tr>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(cfg.name)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
            f"<h1>False Promise sweep: {html.escape(cfg.student)} imitating {html.escape(cfg.teacher)}</h1>"
            f"<img alt='style and substance vs N' src='data:image/png;base64,{figure}'>"
            "<table id='sweep'><tr><th>N</th><th>style (win rate vs teacher)</th><th>substance (mean score)</th>"
            f"<th>mean answer chars</th>{head}</tr>{''.join(rows)}</table></body></html>")


def run(cfg: SweepConfig) -> dict[str, Any]:
    """Run every point of the sweep (skipping finished ones), then write sweep.json / sweep.png / sweep.html."""
    recipe = build_recipe(cfg)
    run_recipe(recipe)
    run_dir = Path(cfg.runs_dir) / cfg.name
    points, teacher = _points(run_dir, cfg.sizes)
    figure = _figure(points, teacher)
    (run_dir / "sweep.png").write_bytes(base64.b64decode(figure))
    (run_dir / "sweep.json").write_text(json.dumps({"points": points, "teacher": teacher}, indent=2, default=str))
    out = run_dir / "sweep.html"
    out.write_text(_html(cfg, points, teacher, figure), encoding="utf-8")
    return {"points": len(points), "html": str(out)}
