"""Figures embedded in HTML pages: matplotlib without a display, PNG as base64."""

from __future__ import annotations

import base64
import io
from typing import Any

__all__ = ["pyplot", "png_base64"]


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
