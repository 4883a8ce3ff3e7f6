"""The data card: what a curation run did, as `card.md` and a self-contained `card.html`.

Counts in/out per step and per source, removal reasons with an example, message-length
histograms per role (input vs output, a PNG embedded as base64), language mix, the largest
duplicate clusters with examples, and contamination hits. All record text is HTML-escaped
(Jinja autoescape): training data is untrusted and may contain markup or scripts.
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path
from typing import Any

from jinja2 import Environment

__all__ = ["write_card", "lengths_png"]

_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>protege data card</title>
<style>
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.n{text-align:right;font-variant-numeric:tabular-nums}.text{max-width:420px;white-space:pre-wrap;font-size:.9em}
</style></head><body>
<h1>Data card</h1>
<p>protege curate, {{ when }}. Inputs: {% for p in inputs %}<code>{{ p }}</code>{% if not loop.last %}, {% endif %}{% endfor %}</p>
<h2>Counts per step</h2>
<table id="counts"><tr><th>step</th><th>in</th><th>removed</th><th>added</th><th>out</th><th>seconds</th></tr>
<tr><td>read</td><td class="n">{{ r.inputs.records }}</td><td class="n">{{ r.inputs.unreadable }}</td><td class="n">0</td><td class="n">{{ r.inputs.records - r.inputs.unreadable }}</td><td></td></tr>
{% for s in r.steps %}<tr><td>{{ s.step }}</td><td class="n">{{ s.in }}</td><td class="n">{{ s.removed }}</td><td class="n">{{ s.added }}</td><td class="n">{{ s.out }}</td><td class="n">{{ s.seconds }}</td></tr>
{% endfor %}<tr><th>total</th><th class="n">{{ r.inputs.records }}</th><th class="n">{{ total_removed }}</th><th class="n">{{ total_added }}</th><th class="n">{{ total_out }}</th><th></th></tr></table>
<h2>Per source</h2>
<table id="sources"><tr><th>source</th><th>in</th><th>removed</th><th>out</th></tr>
{% for s in sources %}<tr><td>{{ s.name }}</td><td class="n">{{ s.in }}</td><td class="n">{{ s.removed }}</td><td class="n">{{ s.out }}</td></tr>{% endfor %}</table>
<h2>Removal reasons</h2>
<table id="reasons"><tr><th>step</th><th>reason</th><th>records</th><th>example</th></tr>
{% for x in reasons %}<tr><td>{{ x.step }}</td><td>{{ x.reason }}</td><td class="n">{{ x.count }}</td><td class="text">{{ x.example }}</td></tr>{% endfor %}</table>
<h2>Message lengths (words) per role</h2>
{% if png %}<img alt="length histograms per role" src="data:image/png;base64,{{ png }}">{% endif %}
{% if languages %}<h2>Language mix</h2>
<table id="languages"><tr><th>language</th><th>records</th></tr>{% for k, v in languages.items() %}<tr><td>{{ k }}</td><td class="n">{{ v }}</td></tr>{% endfor %}</table>{% endif %}
{% if clusters %}<h2>Largest duplicate clusters</h2>
<table id="clusters"><tr><th>kind</th><th>size</th><th>similarity</th><th>kept</th><th>a removed member</th></tr>
{% for c in clusters %}<tr><td>{{ c.kind }}</td><td class="n">{{ c.size }}</td><td class="n">{{ c.similarity }}</td><td class="text">{{ c.kept }}: {{ c.kept_text }}</td><td class="text">{{ c.members[1] }}: {{ c.example }}</td></tr>{% endfor %}</table>{% endif %}
{% if eval_sets %}<h2>Contamination</h2>
<table id="eval-sets"><tr><th>eval set</th><th>prompts</th><th>prompts hit</th></tr>{% for k, v in eval_sets.items() %}<tr><td>{{ k }}</td><td class="n">{{ v.prompts }}</td><td class="n">{{ v.prompts_hit }}</td></tr>{% endfor %}</table>
{% if hits %}<table id="hits"><tr><th>training record</th><th>eval item</th><th>method</th><th>score</th><th>eval prompt</th></tr>
{% for h in hits %}<tr><td>{{ h.train_id }}</td><td>{{ h.eval_set }}:{{ h.eval_id }}</td><td>{{ h.method }}</td><td class="n">{{ h.score }}</td><td class="text">{{ h.eval_text }}</td></tr>{% endfor %}</table>{% endif %}{% endif %}
{% if markers %}<h2>Conditional-training markers</h2><p>positive: <code>{{ markers.positive }}</code>, negative: <code>{{ markers.negative }}</code> (placement: {{ markers.placement }}). Use the positive marker at inference.</p>{% endif %}
</body></html>
"""


def _bin_labels(bins: list[int]) -> list[str]:
    labels = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        labels.append(f"{lo}" if hi - lo == 1 else (f"{lo}+" if hi >= 1 << 29 else f"{lo}-{hi - 1}"))
    return labels


def lengths_png(report: dict[str, Any]) -> bytes:
    """Bar charts of words per message, one panel per role, input vs output."""
    import numpy as np

    from ..figures import pyplot

    plt = pyplot()

    before, after = report["inputs"]["lengths"], report["lengths_out"]
    roles = sorted(set(before) | set(after), key=["system", "user", "assistant"].index)
    labels = _bin_labels(report["length_bins"])
    fig, axes = plt.subplots(1, max(1, len(roles)), figsize=(4.2 * max(1, len(roles)), 3.2), squeeze=False)
    x = np.arange(len(labels))
    for ax, role in zip(axes[0], roles):
        ax.bar(x - 0.2, before.get(role, [0] * len(labels)), width=0.4, label="input", color="#9bb")
        ax.bar(x + 0.2, after.get(role, [0] * len(labels)), width=0.4, label="output", color="#357")
        ax.set_title(role)
        ax.set_xticks(x, labels, rotation=60, fontsize=7)
        ax.set_xlabel("words per message")
    axes[0][0].set_ylabel("messages")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _context(report: dict[str, Any]) -> dict[str, Any]:
    steps = report["steps"]
    sources = []
    names = sorted(set(report["inputs"]["per_source"]) | set(report["per_source_out"]))
    for name in names:
        sources.append({"name": name or "-", "in": report["inputs"]["per_source"].get(name, 0),
                        "removed": report["removed_per_source"].get(name, 0), "out": report["per_source_out"].get(name, 0)})
    reasons = []
    for key, count in sorted(report["removed_by"].items(), key=lambda kv: -kv[1]):
        step, reason = key.split(":", 1)
        reasons.append({"step": step, "reason": reason, "count": count, "example": report["removed_examples"].get(key, "")})
    stats: dict[str, Any] = {}
    for s in steps:
        for k, v in s["stats"].items():
            if k == "top_clusters":
                stats.setdefault(k, []).extend(v)
            elif k == "contamination_hits":
                stats.setdefault(k, []).extend(v)
            elif k == "eval_sets":
                stats.setdefault(k, {}).update(v)
            else:
                stats[k] = v
    return {"r": report, "inputs": report.get("input_paths", []), "sources": sources, "reasons": reasons,
            "total_removed": sum(report["removed_by"].values()), "total_added": sum(s["added"] for s in steps),
            "total_out": sum(report["per_source_out"].values()), "languages": stats.get("languages"),
            "clusters": sorted(stats.get("top_clusters", []), key=lambda c: (-c["size"], c["kind"] != "near"))[:20],
            "eval_sets": stats.get("eval_sets"), "hits": stats.get("contamination_hits", [])[:200],
            "markers": stats.get("markers"), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")[:300]


def _md_table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _markdown(c: dict[str, Any], png_name: str) -> str:
    r = c["r"]
    parts = [f"# Data card\n\nprotege curate, {c['when']}. Inputs: {', '.join(c['inputs'])}\n",
             "## Counts per step\n",
             _md_table(["step", "in", "removed", "added", "out", "seconds"],
                       [["read", r["inputs"]["records"], r["inputs"]["unreadable"], 0,
                         r["inputs"]["records"] - r["inputs"]["unreadable"], ""]]
                       + [[s["step"], s["in"], s["removed"], s["added"], s["out"], s["seconds"]] for s in r["steps"]]
                       + [["total", r["inputs"]["records"], c["total_removed"], c["total_added"], c["total_out"], ""]]),
             "## Per source\n", _md_table(["source", "in", "removed", "out"], [[s["name"], s["in"], s["removed"], s["out"]] for s in c["sources"]]),
             "## Removal reasons\n", _md_table(["step", "reason", "records", "example"],
                                               [[x["step"], x["reason"], x["count"], x["example"]] for x in c["reasons"]]),
             f"## Message lengths (words) per role\n\n![length histograms]({png_name})\n"]
    if c["languages"]:
        parts += ["## Language mix\n", _md_table(["language", "records"], list(c["languages"].items()))]
    if c["clusters"]:
        parts += ["## Largest duplicate clusters\n", _md_table(
            ["kind", "size", "similarity", "kept", "a removed member"],
            [[x["kind"], x["size"], x["similarity"], f"{x['kept']}: {x['kept_text']}", f"{x['members'][1]}: {x['example']}"]
             for x in c["clusters"]])]
    if c["eval_sets"]:
        parts += ["## Contamination\n", _md_table(["eval set", "prompts", "prompts hit"],
                                                  [[k, v["prompts"], v["prompts_hit"]] for k, v in c["eval_sets"].items()])]
        if c["hits"]:
            parts.append(_md_table(["training record", "eval item", "method", "score", "eval prompt"],
                                   [[h["train_id"], f"{h['eval_set']}:{h['eval_id']}", h["method"], h["score"], h["eval_text"]]
                                    for h in c["hits"]]))
    if c["markers"]:
        m = c["markers"]
        parts.append(f"## Conditional-training markers\n\npositive `{m['positive']}`, negative `{m['negative']}` "
                     f"(placement: {m['placement']}). Use the positive marker at inference.\n")
    return "\n".join(parts)


def write_card(out_dir: str | Path, report: dict[str, Any]) -> list[Path]:
    """Write card.md, card_lengths.png and card.html into `out_dir`; return their paths."""
    out = Path(out_dir)
    ctx = _context(report)
    png = lengths_png(report)
    (out / "card_lengths.png").write_bytes(png)
    (out / "card.md").write_text(_markdown(ctx, "card_lengths.png"), encoding="utf-8")
    html = Environment(autoescape=True).from_string(_HTML).render(png=base64.b64encode(png).decode("ascii"), **ctx)
    (out / "card.html").write_text(html, encoding="utf-8")
    return [out / "card.md", out / "card.html", out / "card_lengths.png"]
