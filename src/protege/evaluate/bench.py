"""`protege eval bench`: score one model on benchmark tasks; per-item JSONL + results.json + manifest.

Output folder:
    items/<task>.jsonl   one line per scored item (prompt, gold, prediction, scores); appended as we go,
                         so a killed run resumes where it stopped (`items/<task>.key` detects a changed setup)
    results.json         per-task metrics, the model, the prompting used
    config.yaml, manifest.json
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from ..config import StageConfig
from ..files import json_digest, tolerant_jsonl
from ..manifest import StageRun
from ..precision import PRECISION_HELP, Precision, resolve_precision
from ..records import JsonlWriter
from .intervals import bootstrap_ci
from ..tasks.spec import TaskSpec, load_items, resolve_task, split_fewshot

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers import PreTrainedTokenizerBase

__all__ = ["BenchConfig", "run", "evaluate_task", "DEFAULT_TASKS", "PRIMARY_METRIC", "RESULTS_FILE"]

RESULTS_FILE = "results.json"

DEFAULT_TASKS = ["world_knowledge", "arithmetic", "clickbait", "sql_shop"]
PRIMARY_METRIC = {"multiple_choice": "acc", "generate": "exact_match", "classify": "acc", "sql": "execution_accuracy"}


class BenchConfig(StageConfig):
    model: str = Field("gemma-3-270m", description="model alias, HF folder or .gguf to evaluate")
    model_name: str | None = Field(None, description="name in reports (default: derived from `model`)")
    tasks: list[str] = Field(default_factory=lambda: list(DEFAULT_TASKS),
                             description="built-in task names, task YAML paths, agieval:FILE, bbh:FILE")
    out_dir: str = Field("runs/eval/bench", description="output folder")
    prompt_style: Literal["auto", "chat", "plain"] = Field(
        "auto", description="chat = the model's chat format; plain = lm-eval style text; auto = chat when "
        "the tokenizer carries its own chat template")
    fewshot: int | None = Field(None, description="shots for every task (default: each task's own setting)")
    limit: int | None = Field(None, description="evaluate at most this many items per task")
    batch_size: int = Field(8, description="questions per forward (multiple choice) / sequences per batch")
    max_length: int = Field(2048, description="context tokens kept (oldest dropped) for log-likelihoods")
    precision: Precision = Field("auto", description=PRECISION_HELP)
    device: str | None = Field(None, description="cpu / cuda (default: cuda when available)")
    other_style: bool = Field(True, description="a chat model is also scored with plain prompting (results.json "
                              "`other_style`), so a prompt-format effect is never read as lost capability")
    bootstrap_iters: int = Field(1000, description="bootstrap resamples for each task's 95% interval")


def _model_name(cfg: BenchConfig) -> str:
    from .answer import display_name

    return cfg.model_name or display_name(cfg.model)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n > 0 and not math.isnan(p) else float("nan")


def item_score(task_type: str, record: dict[str, Any]) -> float:
    """One item's primary score (1/0 for all built-in metrics)."""
    return float(record["acc"]) if task_type == "multiple_choice" else float(record["correct"])


def aggregate(task_type: str, records: list[dict[str, Any]], iters: int = 1000) -> dict[str, Any]:
    """Task metrics from per-item records (all means over items, invalid answers count as wrong), with
    a percentile-bootstrap 95% interval on the primary metric and the per-item scores (for paired
    comparisons between models in the report)."""
    n = len(records)
    m: dict[str, Any] = {"n": n}
    if task_type == "multiple_choice":
        for k in ("acc", "acc_norm", "acc_bytes"):
            m[k] = _mean([r[k] for r in records])
    elif task_type == "generate":
        m["exact_match"] = _mean([float(r["correct"]) for r in records])
        m["answer_found"] = _mean([float(r["extracted"] is not None) for r in records])
    elif task_type == "classify":
        m["acc"] = _mean([float(r["correct"]) for r in records])
        m["format_adherence"] = _mean([float(r["valid"]) for r in records])
    else:
        m["execution_accuracy"] = _mean([float(r["correct"]) for r in records])
        m["valid_sql"] = _mean([float(r["valid"]) for r in records])
    if task_type != "multiple_choice":
        m["mean_output_chars"] = _mean([len(r.get("output", "")) for r in records])
    primary = PRIMARY_METRIC[task_type]
    m["primary"] = primary
    m["score"] = m[primary]
    m["stderr"] = _stderr(m[primary], n)
    scores = {r["id"]: item_score(task_type, r) for r in records}
    m["ci"] = bootstrap_ci(list(scores.values()), iters, seed=0)
    m["item_scores"] = scores
    return m


class _Runner:
    """Holds the loaded model (and, lazily, an engine) for every task of one bench run."""

    def __init__(self, cfg: BenchConfig, model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None):
        from ..chat import ChatFormat
        from ..models import load

        self.cfg = cfg
        if model is None:
            model, tokenizer = load(cfg.model, dtype=resolve_precision(cfg.precision, cfg.device).torch_name,
                                    device=cfg.device)
        self.model, self.tok = model, tokenizer
        fmt = ChatFormat.from_tokenizer(tokenizer)
        use_chat = cfg.prompt_style == "chat" or (cfg.prompt_style == "auto" and fmt.name == "tokenizer")
        self.chat = fmt if use_chat else None
        self._engine = None

    @property
    def engine(self) -> Any:
        if self._engine is None:
            from ..engine import Engine

            self._engine = Engine(self.model, self.tok, max_batch_size=max(self.cfg.batch_size, 1))
        return self._engine


def _task_key(cfg: BenchConfig, spec: TaskSpec, style: str, fewshot: int) -> str:
    return json_digest([cfg.model, spec.model_dump(mode="json"), style, fewshot, cfg.max_length,
                        *resolve_precision(cfg.precision, cfg.device).cache_tag], 16)


def _load_done(path: Path, key_path: Path, key: str) -> dict[str, dict[str, Any]]:
    """Records already scored under the same setup; a different setup starts the task afresh."""
    if not path.exists() or not key_path.exists() or key_path.read_text().strip() != key:
        path.unlink(missing_ok=True)
        key_path.write_text(key)
        return {}
    done = {}
    for rec in tolerant_jsonl(path):  # a line cut by a kill mid-write is skipped: that item is scored again
        if "id" in rec:
            done[rec["id"]] = rec
    return done


def evaluate_task(runner: _Runner, spec: TaskSpec, out_dir: Path, suffix: str = "") -> dict[str, Any]:
    """Score every (remaining) item of one task; returns its aggregate metrics.
    `suffix` names the item files of a second prompt style (items/<task><suffix>.jsonl)."""
    from tqdm.auto import tqdm

    from . import scorers

    cfg = runner.cfg
    k = spec.fewshot if cfg.fewshot is None else cfg.fewshot
    items = load_items(spec)
    shots, items = split_fewshot(spec, items, k)
    if cfg.limit is not None:
        items = items[: cfg.limit]
    style = "chat" if runner.chat is not None else "plain"
    (out_dir / "items").mkdir(parents=True, exist_ok=True)
    path = out_dir / "items" / f"{spec.name}{suffix}.jsonl"
    done = _load_done(path, out_dir / "items" / f"{spec.name}{suffix}.key", _task_key(cfg, spec, style, k))
    todo = [it for it in items if it["id"] not in done]
    scorer = scorers.make_scorer(runner, spec, shots)
    # Multiple choice: many questions per call so `score_sorted` can batch them by length (the per-item
    # file is still appended after each call, so a kill loses at most one call's items).
    step = max(cfg.batch_size * 8, 16) if spec.type == "multiple_choice" else max(cfg.batch_size * 4, 16)
    with JsonlWriter(path, append=True) as writer, \
            tqdm(total=len(items), initial=len(items) - len(todo), desc=f"{spec.name} ({style})", unit="item") as bar:
        for start in range(0, len(todo), step):
            batch = todo[start:start + step]
            for rec in scorer(batch):
                rec = {"task": spec.name, **rec}
                writer.write(rec)
                done[rec["id"]] = rec
            bar.update(len(batch))
    records = [done[it["id"]] for it in items]
    metrics = aggregate(spec.type, records, cfg.bootstrap_iters)
    metrics.update(type=spec.type, fewshot=k, prompt_style=style, description=spec.description)
    return metrics


def run(cfg: BenchConfig, model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None) -> dict[str, Any]:
    """Evaluate `cfg.model` on `cfg.tasks`; writes the output folder and returns {task: metrics}.

    `model`/`tokenizer` may be passed in (already loaded) to skip loading `cfg.model`.
    """
    specs = [resolve_task(t) for t in cfg.tasks]  # fail on a bad task before loading the model
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"two tasks share a name: {names}")
    stage = StageRun("eval-bench", cfg, cfg.out_dir)
    out = stage.out
    runner = _Runner(cfg, model, tokenizer)
    results: dict[str, Any] = {}
    for spec in specs:
        results[spec.name] = evaluate_task(runner, spec, out)
    other: dict[str, Any] | None = None
    if cfg.other_style and runner.chat is not None:
        plain = copy.copy(runner)
        plain.chat = None
        other = {"prompt_style": "plain", "tasks": {s.name: evaluate_task(plain, s, out, ".plain") for s in specs}}
    seconds = stage.seconds
    summary = {"model": cfg.model, "model_name": _model_name(cfg),
               "prompt_style": "chat" if runner.chat is not None else "plain",
               "tasks": results, "other_style": other, "seconds": round(seconds, 2)}
    (out / RESULTS_FILE).write_text(json.dumps(summary, indent=2, allow_nan=True), encoding="utf-8")
    inputs = [s.path(s.data) for s in specs if not s.data.startswith("hf:")]
    model_path = Path(cfg.model)
    stage.finish(inputs=inputs + ([model_path] if model_path.is_dir() else []),
                 outputs=[out / RESULTS_FILE] + [out / "items" / f"{n}{x}.jsonl" for n in names
                                                   for x in ([""] + ([".plain"] if other else []))],
                 counts={n: results[n]["n"] for n in names})
    return {n: {"score": r["score"], "metric": r["primary"], "n": r["n"]} for n, r in results.items()}
