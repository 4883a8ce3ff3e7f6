"""The scaling page: IsoFLOP curves, the fitted laws with intervals, and LLaMA's over-training point."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..figures import png_base64, pyplot
from ..files import atomic_write_json
from ..train.llama import fmt_count
from .fit import ScalingFit

__all__ = ["write_report", "overtraining"]


def _ci(fit: ScalingFit, key: str, digits: int = 3) -> str:
    iv = fit.intervals.get(key)
    return f" [{iv[0]:.{digits}f}, {iv[1]:.{digits}f}]" if iv else ""


def overtraining(results: list[dict[str, Any]], optimal_ratio: float | None) -> list[dict[str, Any]]:
    """Per size, its runs in order of tokens: does held-out loss keep falling past the optimal tokens/param?"""
    rows = []
    for size in sorted({r["params"] for r in results}):
        runs = sorted((r for r in results if r["params"] == size), key=lambda r: r["tokens"])
        if len(runs) < 2:
            continue
        ratios = [r["tokens"] / r["params"] for r in runs]
        past = [r for r, q in zip(runs, ratios) if optimal_ratio and q > optimal_ratio]
        falling = all(b["eval_loss"] < a["eval_loss"] for a, b in zip(runs, runs[1:]))
        rows.append({"size": runs[0]["size"], "shape": f"{runs[0]['depth']}x{runs[0]['width']}", "params": runs[0]["params"], "tokens": [r["tokens"] for r in runs],
                     "tokens_per_param": [round(q, 1) for q in ratios], "eval_loss": [r["eval_loss"] for r in runs],
                     "runs_past_optimum": len(past), "loss_keeps_falling": falling})
    return rows


def _figure(results: list[dict[str, Any]], fit: ScalingFit, optimal_ratio: float | None) -> str:
    plt = pyplot()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.3))
    budgets = sorted({r["budget"] for r in results})
    for i, (c, bf) in enumerate(zip(budgets, fit.budgets)):
        runs = sorted((r for r in results if r["budget"] == c), key=lambda r: r["params"])
        color = f"C{i % 10}"
        ax1.plot([r["params"] for r in runs], [r["eval_loss"] for r in runs], "o", color=color, label=f"C = {c:.1e}")
        xs = np.linspace(math.log(runs[0]["params"]), math.log(runs[-1]["params"]), 60)
        ax1.plot(np.exp(xs), np.polyval(bf.coeffs, xs), "-", color=color, alpha=0.6)
        if bf.interior:
            ax1.plot([bf.n_opt], [bf.loss_opt], "*", color=color, ms=14, mec="black")
    from matplotlib.ticker import NullFormatter

    ax1.set_xscale("log")
    ax1.xaxis.set_minor_formatter(NullFormatter())  # log-axis minor labels collide over a narrow range
    sizes = sorted({r["params"] for r in results})
    ax1.set_xticks(sizes, [fmt_count(n) for n in sizes], fontsize=7)
    ax1.set_xlabel("non-embedding parameters N")
    ax1.set_ylabel("held-out loss (nats/token)")
    ax1.set_title("IsoFLOP curves (star: fitted optimum)")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    ok = [b for b in fit.budgets if b.interior]
    if ok:
        cs = np.array([b.flops for b in ok])
        ax2.loglog(cs, [b.n_opt for b in ok], "o", color="C0", label="N_opt")
        ax2.loglog(cs, [b.d_opt for b in ok], "s", color="C1", label="D_opt (tokens)")
        if fit.a is not None and len(ok) >= 2:
            grid = np.geomspace(cs.min(), cs.max(), 20)
            ax2.loglog(grid, np.exp(fit.k_n) * grid ** fit.a, "-", color="C0", label=f"N ∝ C^{fit.a:.2f}")
            ax2.loglog(grid, np.exp(fit.k_d) * grid ** fit.b, "-", color="C1", label=f"D ∝ C^{fit.b:.2f}")
    ax2.xaxis.set_minor_formatter(NullFormatter())
    ax2.set_xticks(budgets, [f"{c:.1e}" for c in budgets], fontsize=7)
    ax2.set_xlabel("compute C (training FLOPs)")
    ax2.set_title("Compute-optimal size and tokens")
    if ok:
        ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3, which="both")
    for i, size in enumerate(sorted({r["params"] for r in results})):
        runs = sorted((r for r in results if r["params"] == size), key=lambda r: r["tokens"])
        if len(runs) > 1:
            ax3.plot([r["tokens"] / r["params"] for r in runs], [r["eval_loss"] for r in runs], "o-",
                     color=f"C{i % 10}", label=f"N = {size:,}")
    if optimal_ratio is not None:
        ax3.axvline(optimal_ratio, color="black", ls="--", lw=1, label="fitted optimum")
    ax3.set_xscale("log")
    ax3.set_xlabel("tokens per parameter (D / N)")
    ax3.set_ylabel("held-out loss")
    ax3.set_title("Fixed size, more tokens (LLaMA)")
    ax3.legend(fontsize=7)
    ax3.grid(alpha=0.3)
    return png_base64(fig)


def write_report(cfg: Any, results: list[dict[str, Any]], skipped: list[dict[str, Any]], fit: ScalingFit,
                 out_dir: Path, corpus_tokens: int | None) -> dict[str, Any]:
    ok = [b for b in fit.budgets if b.interior]
    ratio = float(np.exp(np.mean(np.log([b.d_opt / b.n_opt for b in ok])))) if ok else None
    over = overtraining(results, ratio)
    if fit.a is not None:
        headline = (f"N_opt ∝ C^{fit.a:.3f}{_ci(fit, 'a')}, D_opt ∝ C^{fit.b:.3f}{_ci(fit, 'b')}; "
                    f"{ratio:.1f} tokens per parameter at the optimum ({len(ok)} of {len(fit.budgets)} budgets "
                    "with an interior minimum; Chinchilla: a ≈ b ≈ 0.5, ~20 tokens/param)")
    else:
        headline = (f"{len(ok)} of {len(fit.budgets)} budgets have an interior minimum: too few for a power law "
                    "(widen `sizes` or add budgets)")
    summary = {"headline": headline, "a": fit.a, "b": fit.b, "tokens_per_param": ratio, "runs": len(results),
               "skipped": len(skipped), "interior_budgets": len(ok), "budgets": len(fit.budgets),
               "corpus_train_tokens": corpus_tokens}
    doc = {"summary": summary, "fit": fit.to_json(), "runs": results, "skipped": skipped, "overtraining": over}
    atomic_write_json(out_dir / "scaling.json", doc)

    md = [f"# Scaling (IsoFLOP)\n\n{headline}\n", "| budget C | optimal N | optimal D | tokens/param | loss at optimum | "
          "sizes tried |", "|---|---|---|---|---|---|"]
    for i, b in enumerate(fit.budgets):
        if b.interior:
            md.append(f"| {b.flops:.2e} | {b.n_opt:,.0f}{_ci(fit, f'n_opt[{i}]', 0)} | {b.d_opt:,.0f} | "
                      f"{b.d_opt / b.n_opt:.1f}{_ci(fit, f'tokens_per_param[{i}]', 1)} | {b.loss_opt:.4f} | "
                      f"{b.sizes[0]:,.0f}–{b.sizes[1]:,.0f} |")
        else:
            md.append(f"| {b.flops:.2e} | no interior minimum | – | – | – | {b.sizes[0]:,.0f}–{b.sizes[1]:,.0f} |")
    md += ["", "| budget | shape (layers x width) | N (non-embedding) | tokens D | D/N | passes | held-out loss | bits/byte | tokens/s | MFU |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["budget"], r["params"])):
        md.append(f"| {r['budget']:.1e} | {r['depth']}x{r['width']} | {r['params']:,} | {r['tokens']:,} | {r['tokens'] / r['params']:.1f} | "
                  f"{r['epochs']:.2f} | {r['eval_loss']:.4f} | {r['eval_bpb']} | {r['tokens_per_s']:,.0f} | {r['mfu']} |")
    if over:
        md += ["", "At a fixed size (fixed inference cost), more tokens:", "",
               "| shape | N | tokens/param | held-out loss | keeps falling |", "|---|---|---|---|---|"]
        for o in over:
            md.append(f"| {o['shape']} | {o['params']:,} | {' → '.join(map(str, o['tokens_per_param']))} | "
                      f"{' → '.join(f'{x:.3f}' for x in o['eval_loss'])} | {'yes' if o['loss_keeps_falling'] else 'no'} |")
    if skipped:
        md += ["", "Skipped: " + "; ".join(f"C={s['flops']:.1e} N={s['size']}: {s['reason']}" for s in skipped)]
    text = "\n".join(md) + "\n"
    (out_dir / "scaling.md").write_text(text, encoding="utf-8")
    figure = _figure(results, fit, ratio)
    body = "".join(f"<p>{html.escape(line)}</p>" if not line.startswith("|") else "" for line in text.splitlines()[:3])
    tables = _md_tables_html(text)
    (out_dir / "scaling.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>scaling</title><style>body{font-family:sans-serif;"
        "margin:2em}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        f"text-align:right}}</style></head><body><h1>Scaling (IsoFLOP)</h1>{body}"
        f"<img alt='IsoFLOP curves, optimal N and D vs C, loss vs tokens per parameter' "
        f"src='data:image/png;base64,{figure}' style='max-width:100%'>{tables}</body></html>", encoding="utf-8")
    return summary


def _md_tables_html(text: str) -> str:
    """The Markdown tables (and the lines between them) as HTML."""
    out, rows = [], []
    for line in text.splitlines()[2:] + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                rows.append([c.strip() for c in line.strip("|").split("|")])
            continue
        if rows:
            head, *body = rows
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</table>")
            rows = []
        if line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    return "".join(out)
