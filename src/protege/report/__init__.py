"""`protege report`: one self-contained HTML page (+ report.md) putting style next to substance.

Reads any mix of folders (searched recursively): bench outputs (`results.json`), judge outputs
(`judge_results.json` + `judgments.jsonl`) and answer sets (`answers.jsonl`). One row per model
(base first, students, teacher last). Style columns: judge win rate against the teacher (ties count
half), mean answer length, stop rate (share of answers that ended their turn before the token budget;
a chat model that never stops is not a chat model), format adherence. Substance columns: each benchmark's primary metric.
The imitation gap of a model = its style gain minus its substance gain, both relative to the base;
a large positive gap is the "false promise": it *looks* more like the teacher without knowing more.

Trust: a judge run that failed its calibration (`calibration.py`) is marked not trustworthy and its win
rate gives no style gain. Judge-free style columns come from the answers themselves (`style.py`) and from
`teacher_nll.json` (teacher-likeness). Each benchmark score carries its 95% interval and, for chat models,
the plain-prompting score. The verdict at the top (`verdict`, `headline.py`) is computed from paired
intervals: style from the calibrated judge (else teacher NLL), substance as student − base with the same
(plain) prompting for both.
"""

from __future__ import annotations

import html
from pathlib import Path
from string import Template
from typing import Any

from pydantic import Field

from ..config import StageConfig
from ..files import atomic_write_text
from .pretrain import pretrain_markdown, pretrain_section
from .rl import rl_markdown, rl_section
from .collect import collect, model_table, verdict
from .render import (figures, headline_html, human_markdown, human_section, judge_section, main_table, markdown,
                     samples)

__all__ = ["ReportConfig", "run", "collect", "model_table", "verdict"]

TEMPLATE = Path(__file__).with_name("template.html")


class ReportConfig(StageConfig):
    inputs: list[str] = Field(default_factory=list, description="bench / judge / answer / run folders")
    output: str = Field("report.html", description="HTML file to write; report.md goes next to it")
    base: str | None = Field(None, description="base model row (default: the first model that is not the teacher)")
    teacher: str | None = Field(None, description="teacher row (default: the usual opponent in pairwise judgments)")
    title: str = Field("protege evaluation report", description="page title")
    samples: int = Field(5, description="prompts shown with every model's answer side by side")


def run(cfg: ReportConfig) -> dict[str, Any]:
    """Write the HTML report and report.md; returns their paths and the model count."""
    data = collect(cfg.inputs)
    t = model_table(data, cfg.base, cfg.teacher)
    figs = figures(t, data["judges"])
    e = html.escape
    body = [f"<h1>{e(cfg.title)}</h1><p class=sub>base: {e(str(t['base']))} · teacher: {e(str(t['teacher']))}</p>",
            headline_html(t), "<h2>Style vs substance</h2>", main_table(t),
            "<p class=note>Style = judge win rate against the teacher (ties count half); substance = benchmark scores. "
            "Imitation gap = style gain − substance gain, both relative to the base. A model that copies the "
            "teacher's style without its knowledge has a large positive gap. Stop rate = share of the n answers "
            "that ended their turn on their own rather than being cut at the token budget.</p>",
            "<h2>Figures</h2>"]
    body += [f"<figure><img alt='figure' src='data:image/png;base64,{png}'><figcaption>{e(cap)}</figcaption></figure>"
             for cap, png in figs]
    body += [pretrain_section(data["pretraining"]), rl_section(data["rl"]), "<h2>Judge</h2>", judge_section(data["judges"]), "<h2>People (blind A/B votes)</h2>",
             human_section(data.get("human")),
             "<h2 id=samples>Sample answers side by side</h2>", samples(data, [r["model"] for r in t["rows"]], cfg.samples)]
    page = Template(TEMPLATE.read_text(encoding="utf-8")).safe_substitute(title=e(cfg.title), body="\n".join(body))
    # No folder, config.yaml or manifest of its own, unlike every other stage: `-o FILE` often lands in the
    # current folder or a run's top folder, which `collect` (this report's next run) scans for manifests.
    # The two files are written whole or not at all, so a killed report never leaves half a page.
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    md = out.with_name("report.md") if out.suffix == ".html" else out.with_suffix(".md")
    text = markdown(cfg.title, t, data["judges"]) + pretrain_markdown(data["pretraining"]) + rl_markdown(data["rl"])
    text += human_markdown(data.get("human"))
    atomic_write_text(md, text)
    return {"html": str(out), "markdown": str(md), "models": len(t["rows"]), "figures": len(figs)}
