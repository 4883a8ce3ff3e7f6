"""distill (Vicuna, GPT4All): have a teacher answer a prompt set.

Any records file works as the prompt set (protege JSONL, Alpaca, ShareGPT, OpenAI
messages, or anything `datasets` reads). Only the user turns (and a leading system
message) are used; existing assistant turns are replaced. A multi-turn prompt is
answered turn by turn, each turn seeing the teacher's *own* earlier answers, so the
conversation stays coherent with the new assistant. Prompts are processed in chunks
turn-synchronously (turn 1 of the whole chunk in one batch, then turn 2...), which
keeps the teacher's batches full.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

from pydantic import Field

from ..config import Sampling, StageConfig, sampling_field
from ..errors import StageError
from ..formats import is_question_file, iter_source, read_questions
from ..manifest import Timer
from ..records import Comparison, Conversation
from ..teachers import Teacher, TeacherConfig
from .common import GeneratorRun, clean_reply, sampling

__all__ = ["DistillConfig", "answer_turn_by_turn", "load_prompts", "run"]


class DistillConfig(StageConfig):
    prompts: str | None = Field(None, description="prompt records: .jsonl/.json (protege, Alpaca, ShareGPT, OpenAI), .parquet/.csv or a dataset")
    prompts_format: str = Field("auto", description="format of `prompts`: auto, protege, alpaca, sharegpt, openai, prompt (TRL prompt-only), "
                                "questions (FastChat/MT-bench `turns`: every turn is asked, the teacher's answers in between)")
    out_dir: str = Field("runs/distill", description="where records.jsonl, manifest.json and the teacher cache go")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="who answers")
    system_prompt: str | None = Field(None, description="system message added to prompts that have none")
    max_turns: int = Field(0, ge=0, description="answer at most this many user turns per conversation (0: all)")
    limit: int = Field(0, ge=0, description="use only the first N prompts (0: all)")
    sampling: Sampling = sampling_field("how the teacher samples each answer", max_new_tokens=256)
    seed: int = Field(0, description="seeds sampling (per prompt and turn)")
    chunk_size: int = Field(64, ge=1, description="conversations answered together; each chunk is written when done")
    progress: bool = Field(True, description="show a progress bar")


def load_prompts(path: str | None, fmt: str, limit: int = 0) -> list[tuple[str, str, list[dict[str, str]], dict[str, Any]]]:
    """(id, source, prompt messages: optional system + user turns, meta) for every record of `path`."""
    if not path:
        raise StageError("no prompt set: set `prompts` to a records file (e.g. --prompts=prompts.jsonl)")
    if fmt == "questions" or (fmt == "auto" and is_question_file(path)):  # FastChat question.jsonl: user turns only
        rows = read_questions(path, limit or None)
        return [(r["id"], "questions", [{"role": "user", "content": t} for t in r["turns"]],
                 {"category": r["category"]} if r["category"] else {}) for r in rows]
    out = []
    for rec in iter_source(path, fmt):
        msgs = rec.prompt if isinstance(rec, Comparison) else rec.messages
        keep = [m for m in msgs if m["role"] in ("system", "user")]
        if any(m["role"] == "user" for m in keep):
            out.append((rec.id, rec.source, keep, dict(rec.meta)))
        if limit and len(out) >= limit:
            break
    return out


def answer_turn_by_turn(teacher: Teacher, prompts: list[list[dict[str, str]]], params_for: Callable[[int, int], Any],
                        max_turns: int = 0) -> tuple[list[list[dict[str, str]]], list[str | None], list[list[str]]]:
    """Answer every user turn of each prompt with the teacher's own earlier answers in context.

    `prompts[i]` is an optional system message followed by user messages; `params_for(i, turn)`
    gives the SamplingParams. Returns (conversations ending with an assistant turn, or [] when
    the first answer was empty; why each was cut short or None; finish reasons per answer).
    """
    users = [[m["content"] for m in p if m["role"] == "user"] for p in prompts]
    if max_turns:
        users = [u[:max_turns] for u in users]
    history = [[m for m in p[:1] if m["role"] == "system"] for p in prompts]
    cut: list[str | None] = [None] * len(prompts)
    finish: list[list[str]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    turn = 0
    while active:
        idx = [i for i in active if turn < len(users[i])]
        if not idx:
            break
        convs = [history[i] + [{"role": "user", "content": users[i][turn]}] for i in idx]
        outs = teacher.complete(convs, [params_for(i, turn) for i in idx])
        for i, conv, out in zip(idx, convs, outs):
            text = clean_reply(out.text)
            if not text:  # an empty answer ends the conversation at its last complete exchange
                cut[i] = "empty_answer"
                continue
            history[i] = conv + [{"role": "assistant", "content": text}]
            finish[i].append(out.finish_reason)
        active = [i for i in idx if cut[i] is None]
        turn += 1
    done = [h if any(m["role"] == "assistant" for m in h) else [] for h in history]
    return done, cut, finish


def run(config: DistillConfig) -> dict[str, Any]:
    """Answer every prompt of `config.prompts`; returns the manifest counts."""
    cfg = config
    prompts = load_prompts(cfg.prompts, cfg.prompts_format, cfg.limit)
    if cfg.system_prompt:
        prompts = [(i, s, p if p[0]["role"] == "system" else [{"role": "system", "content": cfg.system_prompt}] + p, m)
                   for i, s, p, m in prompts]
    gen = GeneratorRun("generate.distill", cfg, cfg.out_dir, cfg.teacher)
    counts = distill_into(gen, prompts, cfg, source="distill")
    gen.finish(counts, counts.pop("_seconds"), inputs=[cfg.prompts])
    return counts


def distill_into(gen: GeneratorRun, prompts: list[tuple[str, str, list[dict[str, str]], dict[str, Any]]], cfg: Any,
                 source: str, extra_meta: Callable[[int], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Answer `prompts` chunk by chunk with `gen.teacher`, writing records as each chunk finishes."""
    teacher = gen.teacher
    stats: Counter[str] = Counter()
    with gen.progress(len(prompts), source, "conv", show=cfg.progress) as bar, Timer() as timer:
        for start in range(0, len(prompts), cfg.chunk_size):
            chunk = prompts[start:start + cfg.chunk_size]

            def params_for(i: int, turn: int) -> Any:
                return sampling(cfg.sampling,
                                seed=cfg.seed * 1_000_003 + (start + i) * 101 + turn)

            convs, cut, finish = answer_turn_by_turn(teacher, [p for _, _, p, _ in chunk], params_for,
                                                     getattr(cfg, "max_turns", 0))
            for j, ((pid, psource, _, meta), conv) in enumerate(zip(chunk, convs)):
                if not conv:
                    stats["rejected_empty_answer"] += 1
                    continue
                if cut[j]:
                    stats["truncated_conversations"] += 1
                stats["answers"] += len(finish[j])
                stats["answers_hit_token_limit"] += finish[j].count("length")
                meta = {**meta, "prompt_id": pid, "prompt_source": psource, "finish_reasons": finish[j],
                        **(extra_meta(start + j) if extra_meta else {})}
                gen.writer.write(Conversation(messages=conv, source=source, meta=meta))
                stats["records"] += 1
            if bar is not None:
                bar.update(len(chunk))
                bar.set_postfix(cache_hits=teacher.stats["cache_hits"], refresh=False)
    return {"records": stats["records"], "prompts": len(prompts),
            "rejected": {"empty_answer": stats["rejected_empty_answer"]},
            "truncated_conversations": stats["truncated_conversations"], "answers": stats["answers"],
            "answers_hit_token_limit": stats["answers_hit_token_limit"], "teacher": gen.teacher_counts(),
            "_seconds": timer.seconds}
