"""`protege scaling`: Chinchilla's IsoFLOP experiment on protege's own pretraining.

For each compute budget C and each model size, one `train pretrain` run trains that model on exactly
C / FLOPs-per-token tokens (its steps rounded, so each run's real FLOPs are recorded and used), all on
the same tokenizer, the same token files and the same held-out tokens. Sizes are non-embedding parameter counts; each budget
runs the `sizes_per_budget` consecutive sizes centred where tokens per parameter = 20 (as Chinchilla
centred its grids), and the fit reports whether the minimum landed inside them. Then `fit.py` finds each budget's
loss-optimal size, fits N_opt ∝ C^a and D_opt ∝ C^b with bootstrap intervals, and the page shows
loss against size per budget, the optimal N and D against C, and LLaMA's point from the same runs: at a
fixed size (a fixed inference cost), held-out loss keeps falling as tokens go past the compute-optimal
count.

When the lowest loss of a budget sits at the edge of its sizes, the next size beyond that edge is run too,
until the minimum is bracketed (or the ladder, `min_steps` or `max_epochs` ends it; the page says which).

Runs live in `out_dir/runs/C<budget>-N<size>/` as ordinary pretraining folders: a finished one (its
manifest holds this config) is read back, not rerun; a killed one resumes from its checkpoint. Pairs that
would take fewer than `min_steps` steps or repeat the corpus more than `max_epochs` times are skipped and
listed, not silently dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from ..config import StageConfig
from ..errors import StageError
from ..manifest import StageRun
from ..train.pretrain import PretrainConfig
from .fit import Run, ScalingFit, bootstrap

__all__ = ["ScalingConfig", "run", "RESULTS_FILE"]

RESULTS_FILE = "scaling.json"


class ScalingConfig(StageConfig):
    """IsoFLOP scaling experiment (Chinchilla): several model sizes per compute budget, then N_opt(C), D_opt(C)"""

    pretrain: PretrainConfig = Field(default_factory=PretrainConfig,
                                     description="settings shared by every run (corpus, tokenizer, context, batch, lr, precision)")
    budgets: list[float] = Field(default_factory=lambda: [1e12, 3e12, 1e13], description="compute budgets in training FLOPs")
    sizes: list[str] = Field(default_factory=lambda: ["12K", "25K", "50K", "100K", "150K", "210K", "400K", "650K"],
                             description="non-embedding parameter counts (shapes from `train pretrain`'s model_size)")
    sizes_per_budget: int = Field(5, ge=3, description="sizes run at each budget: the consecutive ones centred where "
                                  "D/N = center_tokens_per_param (Chinchilla centred its grids too); 0 < ... <= len(sizes)")
    center_tokens_per_param: float = Field(20.0, gt=0, description="where each budget's window of sizes is centred "
                                           "(the fit then finds where the minimum really is; an edge minimum is reported)")
    min_steps: int = Field(20, ge=1, description="skip a (budget, size) that would train fewer optimizer steps")
    max_epochs: float = Field(4.0, gt=0, description="skip a (budget, size) that would repeat the corpus more often")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the intervals")
    out_dir: str = Field("runs/scaling", description="where the runs, scaling.json/.html/.md and manifest go")
    seed: int = Field(0, description="seed of every run and of the bootstrap")


def _fmt_c(c: float) -> str:
    """1.2e12 -> "1.2e12" (folder names: two budgets must never share one)."""
    mantissa, exp = f"{c:.6e}".split("e")
    return f"{float(mantissa):g}e{int(exp)}"


def _finished(run_dir: Path, cfg: PretrainConfig) -> dict[str, Any] | None:
    path = run_dir / "manifest.json"
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    return manifest["counts"] if manifest.get("config") == cfg.model_dump(mode="json") else None


def _shared_tokenizer(cfg: ScalingConfig, out_dir: Path) -> PretrainConfig:
    """Every run must see the same tokens: train the tokenizer once here when none is given."""
    from ..train.pretrain import default_tokenizer

    base = cfg.pretrain
    if base.tokenizer or base.model:
        return base
    return base.model_copy(update={"tokenizer": default_tokenizer(base, out_dir / "tokenizer")})


def size_ladder(cfg: ScalingConfig, base: PretrainConfig, vocab: int) -> list[tuple[Any, str]]:
    """(shape, size name) for every configured size, smallest first; sizes that pick the same shape are one."""
    from ..train.llama import parse_count, shape_for

    by_shape: dict[Any, str] = {}
    for s in sorted(set(cfg.sizes), key=parse_count):
        by_shape.setdefault(shape_for(vocab, model_size=s, aspect_ratio=base.aspect_ratio, head_dim=base.head_dim,
                                      gqa_group=base.gqa_group, tie=base.tie_embeddings), s)
    return sorted(by_shape.items(), key=lambda kv: kv[0].non_embedding)


def first_window(cfg: ScalingConfig, ladder: list[tuple[Any, str]], budget: float, seq_len: int) -> tuple[int, int]:
    """[lo, hi) of the `sizes_per_budget` consecutive sizes centred where D/N = center_tokens_per_param."""
    import math

    k = min(cfg.sizes_per_budget, len(ladder))
    ratio = [budget / sh.flops_per_token(seq_len) / sh.non_embedding for sh, _ in ladder]
    mid = min(range(len(ladder)), key=lambda i: abs(math.log(ratio[i] / cfg.center_tokens_per_param)))
    lo = max(0, min(mid - k // 2, len(ladder) - k))
    return lo, lo + k


def run_config(cfg: ScalingConfig, base: PretrainConfig, shape: Any, size: str, budget: float,
               corpus_tokens: int | None, world: int = 1) -> tuple[PretrainConfig | None, str | None]:
    """The pretraining config that spends `budget` on this size, or why that pair is skipped."""
    per_step = base.batch_size * base.max_length * base.grad_accum * world
    tokens = budget / shape.flops_per_token(base.max_length)
    steps = round(tokens / per_step)
    if steps < cfg.min_steps:
        return None, f"{steps} steps < min_steps {cfg.min_steps}"
    if corpus_tokens and tokens / corpus_tokens > cfg.max_epochs:
        return None, f"{tokens / corpus_tokens:.1f} passes over the corpus > max_epochs {cfg.max_epochs}"
    out_dir = Path(cfg.out_dir)
    return base.model_copy(update={
        "depth": None, "model_size": size, "train_tokens": steps * per_step, "max_steps": None,
        "out_dir": str(out_dir / "runs" / f"C{_fmt_c(budget)}-N{size}"), "data_dir": str(out_dir / "data"),
        "seed": cfg.seed}), None


def _result(budget: float, size: str, run_cfg: PretrainConfig, counts: dict[str, Any]) -> dict[str, Any]:
    return {"budget": budget, "size": size, "depth": counts["depth"], "width": counts["width"],
            "params": counts["non_embedding_params"], "total_params": counts["params"], "tokens": counts["train_tokens"],
            "flops": counts["train_flops"], "eval_loss": counts["eval_loss"], "eval_bpb": counts["eval_bpb"],
            "epochs": counts["epochs"], "tokens_per_s": counts["tokens_per_s"], "mfu": counts["mfu"],
            "run_dir": run_cfg.out_dir}


def run(cfg: ScalingConfig) -> dict[str, Any]:
    from ..models import load_tokenizer
    from ..outputs import begin
    from ..train import pretrain
    from .report import write_report

    stage = StageRun("scaling", cfg, cfg.out_dir)
    out_dir = stage.out
    base = _shared_tokenizer(cfg, out_dir).model_copy(update={"data_dir": str(out_dir / "data")})
    tok_source = base.model or base.tokenizer
    tok = load_tokenizer(tok_source)
    ladder = size_ladder(cfg, base, len(tok))
    # Tokenized once, before planning: every run reads these files, and max_epochs needs the corpus size.
    corpus_tokens = int(pretrain.prepare_tokens(base, tok, str(tok_source))[0].meta["train_tokens"])

    def corpus() -> int:
        return corpus_tokens

    n_run = 0

    def train(budget: float, i: int) -> dict[str, Any] | str:
        """One (budget, size): its result (run now or read back), or why it is skipped."""
        nonlocal n_run
        shape, size = ladder[i]
        run_cfg, why = run_config(cfg, base, shape, size, budget, corpus())
        if run_cfg is None:
            return why or "skipped"
        counts = _finished(Path(run_cfg.out_dir), run_cfg)
        if counts is None:
            n_run += 1
            print(f"[protege scaling] run {n_run}: budget {budget:.2g} FLOPs, size {size} ({shape.describe()})", flush=True)
            begin(run_cfg.out_dir)
            pretrain.run(run_cfg)
            counts = _finished(Path(run_cfg.out_dir), run_cfg)
        if counts is None or counts.get("eval_loss") is None:
            raise StageError(f"scaling: run {run_cfg.out_dir} finished without a held-out loss; raise "
                             "pretrain.val_fraction or lower pretrain.batch_size so the held-out data fills a batch")
        return _result(budget, size, run_cfg, counts)

    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for budget in sorted(cfg.budgets):
        # The first window, then one size further down (up) while the lowest loss sits on the lower (upper)
        # edge: the minimum is bracketed whatever the centring guessed, as far as the ladder and limits allow.
        lo, hi = first_window(cfg, ladder, budget, base.max_length)
        done: dict[int, dict[str, Any] | str] = {}
        while True:
            for i in range(lo, hi):
                if i not in done:
                    done[i] = train(budget, i)
            ran = {i: r for i, r in done.items() if isinstance(r, dict)}
            if not ran:
                break
            best = min(ran, key=lambda i: ran[i]["eval_loss"])
            if best == min(ran) and lo > 0 and isinstance(done.get(lo, {}), dict):
                lo -= 1
            elif best == max(ran) and hi < len(ladder) and isinstance(done.get(hi - 1, {}), dict):
                hi += 1
            else:
                break
        for i, r in sorted(done.items()):
            if isinstance(r, dict):
                results.append(r)
            else:
                skipped.append({"flops": budget, "size": ladder[i][1], "params": ladder[i][0].non_embedding, "reason": r})
    if not results:
        raise StageError("scaling: every (budget, size) pair was skipped: " + "; ".join(
            f"{s['flops']:.2g}/{s['size']}: {s['reason']}" for s in skipped))
    # Budgets, not each run's rounded FLOPs, group the runs; N and D are the runs' own.
    fit: ScalingFit = bootstrap([Run(r["budget"], r["params"], r["tokens"], r["eval_loss"]) for r in results],
                                n=cfg.bootstrap, seed=cfg.seed)
    summary = write_report(cfg, results, skipped, fit, out_dir, corpus())
    stage.finish(outputs=[out_dir / RESULTS_FILE, out_dir / "scaling.html", out_dir / "scaling.md"], counts=summary)
    print(f"[protege scaling] {summary['headline']}\npage: {out_dir / 'scaling.html'}", flush=True)
    return summary
