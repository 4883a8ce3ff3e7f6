"""Orca explanation tuning: teacher answers carry reasoning because the system message asks for it.

Every prompt gets one of protege's system messages ("think step by step", "justify each
step", "explain like to a five-year-old", "multiple choice: answer, then why the others are
wrong", ...), chosen among the messages written for its *task type* (a keyword heuristic:
multiple choice, math, code, translation, summarization, classification, extraction,
rewrite, creative, reasoning, open QA), with a seeded per-prompt pick.

Progressive learning (Orca trained first on ChatGPT, then on GPT-4 answers): give
`teachers: [intermediate, strong]` and each stage writes its own dataset
`out_dir/stage{k}/records.jsonl` (own manifest and cache), so SFT can train on them in
order; `out_dir/records.jsonl` holds all stages in order with `meta.stage`.
`stage_limits` gives the number of prompts per stage (Orca: 5M then a 1M subset).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field

from ..config import Sampling, StageConfig, sampling_field
from ..errors import StageError
from ..manifest import StageRun
from ..records import JsonlWriter, content_id, read_records
from ..teachers import TeacherConfig
from .common import GeneratorRun, data_file, read_yaml_data
from .distill import distill_into, load_prompts

__all__ = ["OrcaConfig", "TASK_TYPES", "task_type", "load_system_messages", "assign_system_message", "run"]


class OrcaConfig(StageConfig):
    prompts: str | None = Field(None, description="prompt records (any format `distill` reads); e.g. FLAN-style tasks")
    prompts_format: str = Field("auto", description="format of `prompts`: auto, protege, alpaca, sharegpt, openai")
    out_dir: str = Field("runs/orca", description="where records.jsonl, manifest.json (and stage folders) go")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="the teacher (when `teachers` is empty)")
    teachers: list[TeacherConfig] = Field(default_factory=list, description="progressive mode: teachers in order (intermediate first)")
    stage_limits: list[int] = Field(default_factory=list, description="prompts answered per stage (0: all); one per teacher")
    system_messages: str | None = Field(None, description="YAML list of {id, task_types, text}; default: protege's 16")
    max_turns: int = Field(1, ge=0, description="user turns answered per prompt (Orca: 1; 0: all)")
    limit: int = Field(0, ge=0, description="use only the first N prompts (0: all)")
    sampling: Sampling = sampling_field("how the teacher samples each answer (explanations are long)",
                                        max_new_tokens=384)
    seed: int = Field(0, description="seeds the system-message pick and sampling")
    chunk_size: int = Field(64, ge=1, description="prompts answered together; each chunk is written when done")
    progress: bool = Field(True, description="show a progress bar")


# (type, pattern) in priority order: the first match decides.
_TYPE_RULES: list[tuple[str, re.Pattern[str]]] = [(t, re.compile(p, re.IGNORECASE | re.MULTILINE)) for t, p in [
    ("multiple_choice", r"\b(?:options?|choices?|answer choices)\s*:|^\s*\(?[A-Da-d][).]\s+\S|which of the following"),
    ("code", r"\b(?:python|javascript|java|c\+\+|rust|sql|function|code|program|script|regex|regular expression|"
             r"algorithm|bug|compile)\b"),
    ("translation", r"\btranslat"),
    ("summarization", r"\b(?:summari[sz]e|summary|tl;?dr|in one sentence)\b"),
    ("math", r"\d+\s*[-+*/x×^÷]\s*\d+|\b(?:calculate|compute|solve|how many|how much|sum of|percent(?:age)?|"
             r"equation|probability|area of|average of)\b"),
    ("classification", r"\b(?:classify|categori[sz]e|sentiment|label|true or false|yes or no|fact or opinion|"
                       r"spam|which category|is (?:it|this|the following) (?:a|an))\b"),
    ("extraction", r"\b(?:extract|list all|find all|identify all|pull out|which words)\b"),
    ("rewrite", r"\b(?:rewrite|paraphrase|rephrase|correct the grammar|proofread|make it more|simplify the text)\b"),
    ("creative", r"\b(?:poem|story|haiku|limerick|slogan|essay|song|lyrics|tweet|letter|email|dialogue)\b"),
    ("reasoning", r"\b(?:why|explain|reason|logic|riddle|puzzle|compare|what would happen|cause)\b"),
]]
TASK_TYPES = [t for t, _ in _TYPE_RULES] + ["open_qa"]


def task_type(prompt: str) -> str:
    """A prompt's task type by keyword rules (first match wins), `open_qa` otherwise."""
    for name, pattern in _TYPE_RULES:
        if pattern.search(prompt):
            return name
    return "open_qa"


def load_system_messages(path: str | None = None) -> list[dict[str, Any]]:
    """System messages from YAML; every task type must have at least one."""
    src = path or data_file("orca_system_messages.yaml")
    data = read_yaml_data(src)
    if not isinstance(data, list) or not data:
        raise StageError(f"{src}: expected a YAML list of {{id, task_types, text}}")
    for i, m in enumerate(data):
        if not isinstance(m, dict) or not str(m.get("text", "")).strip() or not m.get("task_types"):
            raise StageError(f"{src}: entry {i + 1} needs `text` and a non-empty `task_types` list")
        unknown = set(m["task_types"]) - set(TASK_TYPES)
        if unknown:
            raise StageError(f"{src}: entry {i + 1} ({m.get('id')}): unknown task types {sorted(unknown)}; "
                             f"known: {', '.join(TASK_TYPES)}")
    missing = [t for t in TASK_TYPES if not any(t in m["task_types"] for m in data)]
    if missing:
        raise StageError(f"{src}: no system message for task type(s) {', '.join(missing)}")
    return data


def assign_system_message(prompt_id: str, prompt: str, messages: list[dict[str, Any]], seed: int = 0) -> tuple[str, dict[str, Any]]:
    """(task type, message) for one prompt; the pick among candidates is a stable hash, not the RNG order."""
    kind = task_type(prompt)
    candidates = [m for m in messages if kind in m["task_types"]]
    pick = int(content_id([prompt_id, seed]), 16) % len(candidates)
    return kind, candidates[pick]


def run(config: OrcaConfig) -> dict[str, Any]:
    """Answer the prompts with Orca system messages, once per teacher (stage); returns the manifest counts."""
    cfg = config
    teachers = cfg.teachers or [cfg.teacher]
    limits = cfg.stage_limits or [0] * len(teachers)
    if len(limits) != len(teachers):
        raise StageError(f"stage_limits has {len(limits)} entries for {len(teachers)} teachers; give one per teacher")
    messages = load_system_messages(cfg.system_messages)
    prompts, kinds = [], []
    for pid, source, msgs, meta in load_prompts(cfg.prompts, cfg.prompts_format, cfg.limit):
        users = [m for m in msgs if m["role"] == "user"]
        kind, sm = assign_system_message(pid, users[0]["content"], messages, cfg.seed)
        meta = {**meta, "task_type": kind, "system_message_id": sm.get("id", "")}
        if msgs[0]["role"] == "system":
            meta["original_system"] = msgs[0]["content"]
        prompts.append((pid, source, [{"role": "system", "content": sm["text"].strip()}] + users, meta))
        kinds.append(kind)
    out = Path(cfg.out_dir)
    progressive = len(teachers) > 1
    top = StageRun("generate.orca", cfg, out) if progressive else None  # the stages' folders and the combined file
    stage_counts, stage_files = [], []
    for k, (tcfg, limit) in enumerate(zip(teachers, limits), 1):
        stage_dir = out / f"stage{k}" if progressive else out
        gen = GeneratorRun("generate.orca" + (f".stage{k}" if progressive else ""), cfg, stage_dir, tcfg)
        subset = prompts[:limit] if limit else prompts
        counts = distill_into(gen, subset, cfg, source="orca", extra_meta=lambda i, k=k: {"stage": k})
        counts["task_types"] = {t: kinds[:len(subset)].count(t) for t in TASK_TYPES if t in kinds[:len(subset)]}
        gen.finish(counts, counts.pop("_seconds"), inputs=[cfg.prompts], extra={"orca_stage": k})
        stage_counts.append({"stage": k, "teacher": gen_name(tcfg), **counts})
        stage_files.append(gen.records_path)
    if top is None:
        return stage_counts[0]
    combined = out / "records.jsonl"
    with JsonlWriter(combined) as w:  # all stages in training order; each record carries meta.stage
        for f in stage_files:
            for rec in read_records(f):
                w.write(rec)
        total = w.written
    counts = {"records": total, "stages": stage_counts}
    top.finish([combined, *stage_files], counts, inputs=[cfg.prompts], extra={"teachers": [gen_name(t) for t in teachers]})
    return counts


def gen_name(t: TeacherConfig) -> str:
    """Teacher label for manifests (backend, model, URL; never the key)."""
    return f"{t.backend}:{t.model}" + (f"@{t.base_url if isinstance(t.base_url, str) else ','.join(t.base_url)}" if t.base_url else "")
