"""Figures: matplotlib without a display, PNG as base64 for HTML pages, and the figures that more than one
layer draws (an RL run saves its over-optimisation plot; the report draws the same plot for all runs)."""

from __future__ import annotations

import base64
import io
from typing import Any

__all__ = ["pyplot", "png_base64", "overoptimisation_figure"]


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (servers and CI have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_base64(fig: Any) -> str:
    """The figure as a base64 PNG (110 dpi, tight), then closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def overoptimisation_figure(runs: list[dict[str, Any]]) -> Any | None:
    """Gold and proxy against sqrt(KL) for each run (`run`, `history`), steps marked; None below two evals."""
    if not any(len(r["history"]) > 1 for r in runs):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, r in enumerate(runs):
        x = [h["sqrt_kl"] for h in r["history"]]
        color = f"C{i % 10}"
        ax.plot(x, [h["gold"] for h in r["history"]], "s-", color=color, label=f"{r['run']}: gold (held out)")
        ax.plot(x, [h["proxy"] for h in r["history"]], "o--", color=color, alpha=0.6, label=f"{r['run']}: proxy")
        for h in r["history"]:
            ax.annotate(str(h["step"]), (h["sqrt_kl"], h["gold"]), fontsize=6, alpha=0.6)
    ax.set_xlabel("sqrt(KL to reference), sqrt(nats per answer)")
    ax.set_ylabel("mean score, held-out prompts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig
