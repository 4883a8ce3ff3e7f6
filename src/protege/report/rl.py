"""The report's reward-optimisation section: every RS / PPO / GRPO run found under the inputs.

Each run's `overoptimisation.json` (written by `train.rl.OverOptimisationWatch`) gives proxy, gold
and KL per held-out evaluation; the section shows start -> end -> best-by-gold, the over-optimisation
warnings, and gold and proxy against sqrt(KL) for all runs on one figure (Gao et al. 2022's axes).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ..figures import overoptimisation_figure, png_base64
from ..outputs import MANIFEST

__all__ = ["collect_rl", "rl_section", "rl_markdown"]


def collect_rl(files: list[Path]) -> list[dict[str, Any]]:
    """One entry per `overoptimisation.json`: its run folder, method (from the manifest) and history."""
    runs = []
    for f in files:
        data = json.loads(f.read_text(encoding="utf-8"))
        if not data.get("history"):
            continue
        manifest = f.with_name(MANIFEST)
        stage = json.loads(manifest.read_text()).get("stage", "") if manifest.exists() else ""
        runs.append({"run": f.parent.name, "where": str(f.parent), "method": stage or "rl", **data})
    return runs


def _row(r: dict[str, Any]) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    h = r["history"]
    return h[0], h[-1], r.get("best") or h[-1]


def rl_section(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return ""
    e = html.escape
    rows = []
    for r in runs:
        start, end, best = _row(r)
        warn = "<br>".join(e(w["message"]) for w in r.get("warnings", [])) or "none"
        rows.append(f"<tr><td class=name>{e(r['run'])}</td><td>{e(r['method'])}</td>"
                    f"<td>{start['proxy']:.3f} → {end['proxy']:.3f}</td><td>{start['gold']:.3f} → {end['gold']:.3f}</td>"
                    f"<td>{end['kl']:.2f}</td><td>{best['gold']:.3f} (step {best['step']})</td>"
                    f"<td style='text-align:left'>{warn}</td></tr>")
    fig = overoptimisation_figure(runs)
    fig = png_base64(fig) if fig is not None else None
    img = (f"<figure><img alt='gold and proxy against sqrt KL' src='data:image/png;base64,{fig}'><figcaption>Gold "
           "(never optimised) and proxy (optimised) on held-out prompts against sqrt(KL to the reference): "
           "when the proxy keeps rising while gold falls, the policy is gaming its reward.</figcaption></figure>"
           if fig else "")
    return ("<h2>Reward optimisation (RS / PPO / GRPO)</h2><table><tr><th class=name>run</th><th>method</th>"
            "<th>proxy, start → end</th><th>gold, start → end</th><th>KL at end (nats/answer)</th>"
            "<th>best gold</th><th>over-optimisation warnings</th></tr>" + "".join(rows) + "</table>" + img)


def rl_markdown(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return ""
    lines = ["", "## Reward optimisation", "", "| run | method | proxy start → end | gold start → end | KL at end | "
             "best gold (step) | warnings |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        start, end, best = _row(r)
        lines.append(f"| {r['run']} | {r['method']} | {start['proxy']:.3f} → {end['proxy']:.3f} | {start['gold']:.3f} → "
                     f"{end['gold']:.3f} | {end['kl']:.2f} | {best['gold']:.3f} ({best['step']}) | "
                     f"{len(r.get('warnings', []))} |")
    return "\n".join(lines) + "\n"
