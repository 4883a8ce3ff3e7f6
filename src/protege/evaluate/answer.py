"""`protege eval answer`: one model's answers to a prompt set, turn by turn, cached (the judge's input).

Prompt files (JSONL), one prompt set per file:
- MT-bench style: {"question_id", "category", "turns": [str, ...], "reference": [str, ...]?}
- protege conversations: {"id", "messages": [...]} (the user turns are asked; assistant turns are ignored)
- simple: {"id"?, "prompt": str, "reference": str?}
Multi-turn prompts are answered turn by turn: turn 2 is asked with the model's *own* turn-1 answer in the
history (as MT-bench does). Answers go through a teacher backend (`local` = the engine on any model spec,
`openai` = any compatible API), whose request cache makes a killed run resume without recomputing.

Output: answers.jsonl — {"id", "category", "turns", "answers", "finish_reasons", "reference", "model"} —
plus manifest. `finish_reasons[k]` says why answer k ended: "stop" (the model ended its turn: an end-of-turn
id or stop string) or "length" (cut at `max_new_tokens`). The manifest counts them (`stopped`,
`cut_at_max_tokens`, `stop_rate`): a chat model that never ends its turn is not a chat model yet.
Answer files written before `finish_reasons` existed still load; their answers count as unknown.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from ..config import Sampling, StageConfig, sampling_field
from ..errors import StageError
from ..manifest import StageRun
from ..records import write_records
from ..teachers import TeacherConfig
from ..files import read_jsonl
from ..formats import read_questions as read_prompts

if TYPE_CHECKING:
    from ..teachers import Teacher

__all__ = ["AnswerConfig", "run", "read_prompts", "read_answers", "display_name", "stop_counts"]

ANSWERS_FILE = "answers.jsonl"
LIKENESS_FILE = "teacher_nll.json"


def display_name(spec: str) -> str:
    """A short model name for tables: the alias, else the folder name (with its parent for generic names)."""
    p = Path(spec)
    return p.name if p.name not in ("hf", "final", "merged", "model", "checkpoint") else f"{p.parent.name}/{p.name}"


class AnswerConfig(StageConfig):
    # The old flat spellings (`model`, `backend`, `base_url`, `batch_size`, `precision`) still work.
    moved_keys: ClassVar[dict[str, str]] = {"model": "answerer.model", "backend": "answerer.backend",
                                            "base_url": "answerer.base_url", "batch_size": "answerer.max_batch_size",
                                            "precision": "answerer.precision"}
    answerer: TeacherConfig = Field(default_factory=TeacherConfig, description="who answers: a local model (alias / "
                                    "HF folder / .gguf) or any OpenAI-compatible API (model, key env, concurrency)")
    model_name: str | None = Field(None, description="name in judgments and reports (default: from the model)")
    prompts: str = Field(..., description="prompt set (JSONL: MT-bench `turns`, protege `messages`, or `prompt`)")
    out_dir: str = Field("runs/eval/answers", description="output folder")
    limit: int | None = Field(None, description="answer at most this many prompts")
    system: str | None = Field(None, description="system message put before every conversation")
    sampling: Sampling = sampling_field("how each turn is answered (greedy by default: reproducible)", max_new_tokens=256)
    seed: int = Field(0, description="sampling seed: same seed + same prompt = same answer")
    teacher_answers: str | None = Field(None, description="held-out answers of the teacher (answers.jsonl or its "
                                        "folder): their per-token NLL under this model is written to "
                                        "teacher_nll.json (teacher-likeness; local torch models only)")


def read_answers(path: str | Path) -> list[dict[str, Any]]:
    """answers.jsonl (or the folder holding it) -> its records."""
    path = Path(path)
    if path.is_dir():
        path = path / ANSWERS_FILE
    if not path.exists():
        raise StageError(f"answers file {path} not found (run `protege eval answer` first)")
    return read_jsonl(path, allow_nan=True)  # protege's own output (json.dumps writes NaN)


def stop_counts(records: list[dict[str, Any]]) -> dict[str, Any]:
    """How the answers ended: {"stopped", "cut_at_max_tokens", "stop_rate"} over answers whose reason is known.

    `stop_rate` = stopped / (stopped + cut), None when no answer records a reason (files from older versions).
    """
    reasons = [f for r in records for f in (r.get("finish_reasons") or [])]
    stopped, cut = reasons.count("stop"), reasons.count("length")
    return {"stopped": stopped, "cut_at_max_tokens": cut,
            "stop_rate": round(stopped / (stopped + cut), 4) if stopped + cut else None}


def _teacher_likeness(teacher: Teacher, cfg: AnswerConfig, out: Path) -> dict[str, Any]:
    """Score the teacher's held-out answers under this model (see `style.teacher_nll`); teacher_nll.json."""
    from .style import teacher_nll

    theirs = read_answers(cfg.teacher_answers)
    engine = getattr(teacher, "engine", None) if cfg.answerer.backend == "local" else None
    model = getattr(engine, "model", None)
    if model is None:
        result: dict[str, Any] = {"nll": None, "why": f"teacher-likeness needs a local torch model; {cfg.answerer.model} "
                                  f"runs on the {cfg.answerer.backend if engine is None else 'llama.cpp'} backend"}
    else:
        convs = []
        for r in theirs:
            conv = [{"role": "system", "content": cfg.system}] if cfg.system else []
            for q, a in zip(r["turns"], r["answers"]):
                conv += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            convs.append(conv)
        result = teacher_nll(model, engine.chat_format, convs, ids=[r["id"] for r in theirs], seed=cfg.seed)
        result["teacher"] = theirs[0].get("model") if theirs else None
    result["teacher_answers"] = str(cfg.teacher_answers)
    (out / LIKENESS_FILE).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def run(cfg: AnswerConfig) -> dict[str, Any]:
    """Answer every prompt turn by turn; writes answers.jsonl + manifest into `out_dir`."""
    from ..engine import SamplingParams
    from ..teachers import make_teacher

    stage = StageRun("eval-answer", cfg, cfg.out_dir)
    out = stage.out
    prompts = read_prompts(cfg.prompts, cfg.limit)
    teacher = make_teacher(cfg.answerer, cache_dir=out)
    params = SamplingParams.from_config(cfg.sampling, cfg.seed)
    histories = [[{"role": "system", "content": cfg.system}] if cfg.system else [] for _ in prompts]
    answers: list[list[str]] = [[] for _ in prompts]
    finish: list[list[str]] = [[] for _ in prompts]  # parallel to answers: "stop" | "length"
    try:
        for turn in range(max(len(p["turns"]) for p in prompts) if prompts else 0):
            active = [i for i, p in enumerate(prompts) if turn < len(p["turns"])]
            for i in active:
                histories[i].append({"role": "user", "content": prompts[i]["turns"][turn]})
            replies = teacher.complete([histories[i] for i in active], params, progress=True)
            for i, reply in zip(active, replies):
                histories[i].append({"role": "assistant", "content": reply.text})
                answers[i].append(reply.text)
                finish[i].append(reply.finish_reason)
        likeness = _teacher_likeness(teacher, cfg, out) if cfg.teacher_answers else None
    finally:
        teacher.close()
    name = cfg.model_name or display_name(cfg.answerer.model)
    records = [{**p, "answers": a, "finish_reasons": f, "model": name} for p, a, f in zip(prompts, answers, finish)]
    write_records(out / ANSWERS_FILE, records)
    model_path = Path(cfg.answerer.model)
    counts = {"prompts": len(records), "turns": sum(len(a) for a in answers), **stop_counts(records)}
    if likeness is not None:
        counts["teacher_nll"] = likeness.get("nll")
    stage.finish(inputs=[cfg.prompts] + ([model_path] if model_path.is_dir() else [])
                 + ([cfg.teacher_answers] if cfg.teacher_answers else []),
                 outputs=[out / ANSWERS_FILE] + ([out / LIKENESS_FILE] if likeness is not None else []), counts=counts)
    return {**counts, "model": name}
