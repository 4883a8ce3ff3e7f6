"""The report's pretraining section: what a from-scratch base was trained on and how far its loss fell."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ..figures import png_base64, pyplot
from ..files import tolerant_jsonl
from ..train.pretrain import STAGE as PRETRAIN_STAGE

__all__ = ["PRETRAIN_STAGE", "read_pretrain", "pretrain_section", "pretrain_markdown", "is_pretrain_manifest"]

_COLUMNS = ("non-embedding params", "params", "tokens", "passes", "train loss", "held-out loss", "bits/byte",
            "unigram entropy", "tokens/s", "MFU")


def read_pretrain(manifest: Path, data: dict[str, Any]) -> dict[str, Any]:
    """One pretraining run from its manifest (already parsed as `data`) and its metrics log."""
    curve = [r for r in tolerant_jsonl(manifest.with_name("metrics.jsonl")) if "step" in r]
    return {"run": manifest.parent.name, "counts": data.get("counts", {}), "curve": curve}


def _cells(c: dict[str, Any]) -> list[str]:
    def num(x: Any, fmt: str) -> str:
        return "–" if x is None else format(x, fmt)

    return [num(c.get("non_embedding_params"), ","), num(c.get("params"), ","), num(c.get("train_tokens"), ","),
            num(c.get("epochs"), ".2f"), num(c.get("final_loss"), ".3f"), num(c.get("eval_loss"), ".3f"),
            num(c.get("eval_bpb"), ".3f"), num(c.get("unigram_entropy"), ".3f"), num(c.get("tokens_per_s"), ",.0f"),
            num(c.get("mfu"), ".3f")]


def _figure(runs: list[dict[str, Any]]) -> str | None:
    if not any(len(r["curve"]) > 1 for r in runs):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, r in enumerate(runs):
        per_step = (r["counts"].get("train_tokens") or 0) / max(r["counts"].get("steps") or 1, 1)
        train = [(p["step"] * per_step, p["loss"]) for p in r["curve"] if "loss" in p]
        held = [(p["step"] * per_step, p["eval_loss"]) for p in r["curve"] if "eval_loss" in p]
        if train:
            ax.plot(*zip(*train), "-", color=f"C{i}", alpha=0.7, label=f"{r['run']}: train")
        if held:
            ax.plot(*zip(*held), "o", color=f"C{i}", label=f"{r['run']}: held out")
        if r["counts"].get("unigram_entropy"):
            ax.axhline(r["counts"]["unigram_entropy"], color=f"C{i}", ls=":", lw=1, label="unigram entropy")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return png_base64(fig)


def pretrain_section(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return ""
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in _COLUMNS)
    rows = "".join(f"<tr><td class=name>{e(r['run'])}</td>" + "".join(f"<td>{e(c)}</td>" for c in _cells(r["counts"]))
                   + "</tr>" for r in runs)
    fig = _figure(runs)
    img = (f"<figure><img alt='pretraining loss' src='data:image/png;base64,{fig}'><figcaption>Training loss "
           "(line) and held-out loss (dots) against tokens; the dotted line is the unigram entropy, the loss of a "
           "model that ignores context.</figcaption></figure>" if fig else "")
    return (f"<h2>Pretraining (from scratch)</h2><table><tr><th class=name>run</th>{head}</tr>{rows}</table>{img}")


def pretrain_markdown(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return ""
    lines = ["", "## Pretraining (from scratch)", "", "| run | " + " | ".join(_COLUMNS) + " |",
             "|---" * (len(_COLUMNS) + 1) + "|"]
    lines += [f"| {r['run']} | " + " | ".join(_cells(r["counts"])) + " |" for r in runs]
    return "\n".join(lines) + "\n"


def is_pretrain_manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("stage") == PRETRAIN_STAGE else None
