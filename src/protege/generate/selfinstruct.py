"""Self-Instruct (Alpaca): bootstrap instruction data from a small pool of seed tasks.

Each round samples a few seed tasks (and, once there are some, tasks generated
earlier) into a prompt, asks the teacher for new tasks, parses the reply, filters the
candidates, then asks the teacher to answer every kept task. Filters, in order:
too short / too long, tasks a text model cannot do (images, files, audio...), odd
first character, exact duplicate, ROUGE-L > `rouge_threshold` against the pool
(seeds + kept tasks; as in Wang et al. 2022). A reply with no parsable task is
counted as malformed, never fatal. Works with a chat teacher (a chat prompt) and
with a base model (a "Task N:" completion prompt, as the original paper did).

Counts in the manifest add up: `generated == kept + sum(rejected.values())`.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field

from ..config import Sampling, StageConfig, sampling_field
from ..errors import StageError
from ..manifest import Timer
from ..records import Conversation
from ..teachers import TeacherConfig
from ..files import read_jsonl
from .common import GeneratorRun, clean_reply, data_file, sampling
from .text import RougePool

__all__ = ["SelfInstructConfig", "Task", "parse_tasks", "task_problem", "run"]


class SelfInstructConfig(StageConfig):
    out_dir: str = Field("runs/self-instruct", description="where records.jsonl, manifest.json and the teacher cache go")
    n: int = Field(100, ge=1, description="number of tasks (with answers) to keep")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="who writes tasks and answers")
    seed_tasks: str | None = Field(None, description="JSONL of seed tasks {instruction, input, output}; default: protege's 115 seeds")
    seed: int = Field(0, description="seeds the example sampling and the teacher's sampling")
    prompt_mode: Literal["auto", "chat", "completion"] = Field(
        "auto", description="chat prompt, or 'Task N:' completion prompt for base models; auto: from the teacher")
    num_prompt_tasks: int = Field(6, ge=1, description="example tasks shown in each prompt")
    num_prompt_generated: int = Field(2, ge=0, description="of those, how many come from generated tasks once there are some")
    new_tasks_per_prompt: int = Field(5, ge=1, description="new tasks asked for per request")
    requests_per_round: int = Field(8, ge=1, description="task-writing requests sent together per round")
    max_requests: int = Field(0, ge=0, description="cap on task-writing requests so a weak teacher still stops (0: 2*n)")
    moved_keys: ClassVar[dict[str, str]] = {
        "task_max_new_tokens": "task_sampling.max_new_tokens", "temperature": "task_sampling.temperature",
        "top_p": "task_sampling.top_p", "answer_max_new_tokens": "answer_sampling.max_new_tokens",
        "answer_temperature": "answer_sampling.temperature"}
    task_sampling: Sampling = sampling_field("how task-writing replies are sampled", max_new_tokens=160,
                                             temperature=0.7, top_p=0.95)
    answer_sampling: Sampling = sampling_field("how answers are sampled", max_new_tokens=160)
    rouge_threshold: float = Field(0.7, ge=0, le=1, description="reject a task whose ROUGE-L with any pool task exceeds this")
    min_words: int = Field(3, ge=1, description="shortest instruction kept, in words")
    max_words: int = Field(150, ge=1, description="longest instruction kept, in words")
    progress: bool = Field(True, description="show a progress bar")


@dataclass
class Task:
    instruction: str
    input: str = ""

    def prompt(self) -> str:
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction


# ---- parsing ---------------------------------------------------------------------------------------

# Markers weak models put in front of a task, possibly repeated ("4. Instruction: 4. ...").
_MARKER = re.compile(r"^(?:[-*•>#]+\s*|\**\(?\d{1,3}\s*[.):\]]\**\s*|\**(?:new\s+)?(?:task|instruction|instructions|"
                     r"question|prompt)\s*\d*\s*[:.)-]\**\s*)", re.IGNORECASE)
_INPUT = re.compile(r"^\**\s*input\s*\**\s*:\s*\**\s*(.*)$", re.IGNORECASE)
_OUTPUT = re.compile(r"^\**\s*(?:output|answer|response|solution)\s*\**\s*:", re.IGNORECASE)
_NO_INPUT = {"", "none", "n/a", "<noinput>", "no input", "-", "null"}
_MAX_TASKS_PER_REPLY = 10


def _strip_markers(line: str) -> tuple[str, bool]:
    marked = False
    while True:
        m = _MARKER.match(line)
        if not m or not m.group(0):
            return line.strip(" *\t\"'"), marked
        line, marked = line[m.end():], True


def parse_tasks(text: str, leading: bool = False) -> list[Task]:
    """Tasks in a teacher's reply: numbered / bulleted / "Task N:" lines, each with an optional "Input:" line.

    Unmarked lines (preambles like "Sure! Here are five tasks:", prose, "Output:" lines) are
    skipped. `leading=True` (completion prompts ending in "Task N:") also takes the text
    before the first marker as a task.
    """
    tasks: list[Task] = []
    current: Task | None = None
    first = True
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        body, marked = _strip_markers(line)
        m = _INPUT.match(line) or _INPUT.match(body)
        if m:
            if current is not None and not current.input:
                value = m.group(1).strip(" *\"")
                current.input = "" if value.lower() in _NO_INPUT else value
            first = False
            continue
        if _OUTPUT.match(line) or _OUTPUT.match(body):
            current, first = None, False
            continue
        if marked or (leading and first):
            current = Task(body) if body and not body.endswith(":") else None
            if current is not None:
                tasks.append(current)
        first = False
        if len(tasks) >= _MAX_TASKS_PER_REPLY:
            break
    return tasks


# ---- filtering -------------------------------------------------------------------------------------

# Tasks a text-only model cannot do (after the Self-Instruct paper's keyword filter).
_NON_TEXT = re.compile(r"\b(?:images?|pictures?|photos?|photographs?|graphs?|diagrams?|flowcharts?|charts?|maps?|"
                       r"draw|drawing|sketch|plot|videos?|audio|music|listen|recordings?|files?|attached|attachment|"
                       r"upload|download|screenshots?|pdf|spreadsheet|go to|click|website)\b", re.IGNORECASE)


def task_problem(task: Task, pool: RougePool, seen: set[str], cfg: SelfInstructConfig) -> str | None:
    """Why a candidate task is rejected (a reason name for the manifest), or None to keep it."""
    words = task.instruction.split()
    if len(words) < cfg.min_words:
        return "too_short"
    if len(words) > cfg.max_words:
        return "too_long"
    if _NON_TEXT.search(task.instruction) or _NON_TEXT.search(task.input):
        return "needs_non_text_modality"
    if not task.instruction[0].isalnum():
        return "bad_first_character"
    if " ".join(words).lower() in seen:
        return "duplicate"
    score, _ = pool.most_similar(task.instruction, cfg.rouge_threshold)
    if score > cfg.rouge_threshold:
        return "similar_to_pool"
    return None


# ---- prompts ---------------------------------------------------------------------------------------


def _examples(rng: random.Random, seeds: list[Task], generated: list[Task], cfg: SelfInstructConfig) -> list[Task]:
    k_gen = min(cfg.num_prompt_generated, len(generated))
    picked = rng.sample(seeds, min(cfg.num_prompt_tasks - k_gen, len(seeds))) + rng.sample(generated, k_gen)
    rng.shuffle(picked)
    return picked


def _listing(examples: list[Task], label: str) -> str:
    lines = []
    for i, t in enumerate(examples, 1):
        lines.append(f"{label}{i}{'.' if not label else ':'} {t.instruction}")
        if t.input:
            lines.append(f"Input: {t.input}")
    return "\n".join(lines)


def chat_task_prompt(examples: list[Task], k: int) -> str:
    start = len(examples) + 1
    return ("Come up with new, diverse tasks that a text assistant could do: questions, writing, "
            "rewriting, classification, reasoning, coding, advice. Some tasks come with an input.\n\n"
            f"Example tasks:\n{_listing(examples, '')}\n\n"
            f"Write {k} new tasks, different from the examples, numbered {start} to {start + k - 1}, "
            "one per line. Put a task's input on the next line after \"Input:\".")


def completion_task_prompt(examples: list[Task]) -> str:
    return f"Come up with a series of tasks:\n\n{_listing(examples, 'Task ')}\nTask {len(examples) + 1}:"


def completion_answer_prompt(task: Task, demos: list[dict[str, Any]]) -> str:
    def block(ins: str, inp: str) -> str:
        return f"Instruction: {ins}\n" + (f"Input: {inp}\n" if inp else "") + "Output:"

    shots = "".join(f"{block(d['instruction'], d.get('input', ''))} {d['output']}\n\n" for d in demos)
    return shots + block(task.instruction, task.input)


# ---- the loop --------------------------------------------------------------------------------------


def _load_seeds(path: str | None) -> list[dict[str, Any]]:
    seeds = read_jsonl(path or data_file("seed_tasks.jsonl"))
    bad = [i + 1 for i, s in enumerate(seeds) if not isinstance(s, dict) or not str(s.get("instruction", "")).strip()]
    if bad:
        raise StageError(f"{path}: line(s) {bad[:5]} have no `instruction`")
    if not seeds:
        raise StageError(f"{path}: no seed tasks")
    return seeds


def run(config: SelfInstructConfig) -> dict[str, Any]:
    """Generate `config.n` instruction/answer records; returns the manifest counts."""
    cfg = config
    seed_rows = _load_seeds(cfg.seed_tasks)
    seeds = [Task(str(s["instruction"]).strip(), str(s.get("input", "") or "").strip()) for s in seed_rows]
    demos = [s for s in seed_rows if s.get("output") and not s.get("input")][:2]
    max_requests = cfg.max_requests or 2 * cfg.n
    gen = GeneratorRun("generate.self-instruct", cfg, cfg.out_dir, cfg.teacher)
    teacher = gen.teacher
    mode = cfg.prompt_mode if cfg.prompt_mode != "auto" else ("chat" if teacher.is_chat_model else "completion")
    rng = random.Random(cfg.seed)
    pool = RougePool([t.instruction for t in seeds])
    seen = {" ".join(t.instruction.split()).lower() for t in seeds}
    generated: list[Task] = []
    rejected: Counter[str] = Counter()
    n_candidates = malformed = requests = answer_requests = kept = rounds = truncated = 0
    with gen.progress(cfg.n, "self-instruct", "task", show=cfg.progress) as bar, Timer() as timer:
        while kept < cfg.n and requests < max_requests:
            k = min(cfg.requests_per_round, max_requests - requests)
            examples = [_examples(rng, seeds, generated, cfg) for _ in range(k)]
            params = [sampling(cfg.task_sampling,
                               seed=cfg.seed * 1_000_003 + requests + j) for j in range(k)]
            if mode == "chat":
                replies = teacher.complete([[{"role": "user", "content": chat_task_prompt(ex, cfg.new_tasks_per_prompt)}]
                                            for ex in examples], params, progress=cfg.progress)
            else:
                replies = teacher.complete_prompts([completion_task_prompt(ex) for ex in examples], params,
                                                   progress=cfg.progress)
            requests += k
            rounds += 1
            new: list[Task] = []
            for reply in replies:
                cands = parse_tasks(reply.text, leading=(mode == "completion"))
                if not cands:
                    malformed += 1
                for task in cands:
                    n_candidates += 1
                    reason = task_problem(task, pool, seen, cfg)
                    if reason:
                        rejected[reason] += 1
                        continue
                    pool.add(task.instruction)
                    seen.add(" ".join(task.instruction.split()).lower())
                    new.append(task)
            room = cfg.n - kept
            if len(new) > room:
                rejected["over_quota"] += len(new) - room
            new = new[:room]
            if not new:
                continue
            answer_requests += len(new)
            ap = sampling(cfg.answer_sampling, seed=cfg.seed)
            if mode == "chat":
                answers = teacher.complete([[{"role": "user", "content": t.prompt()}] for t in new], ap,
                                           progress=cfg.progress)
            else:
                ap.stop = ["\nInstruction:", "\n\n\n"]
                answers = teacher.complete_prompts([completion_answer_prompt(t, demos) for t in new], ap,
                                                   progress=cfg.progress)
            for task, answer in zip(new, answers):
                text = clean_reply(answer.text)
                if not text:
                    rejected["empty_answer"] += 1
                    continue
                generated.append(task)
                rec = Conversation(messages=[{"role": "user", "content": task.prompt()},
                                             {"role": "assistant", "content": text}],
                                   source="self-instruct",
                                   meta={"instruction": task.instruction, "input": task.input, "round": rounds,
                                         "finish_reason": answer.finish_reason})
                gen.writer.write(rec)
                kept += 1
                truncated += answer.finish_reason == "length"
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.set_postfix(requests=requests, cache_hits=teacher.stats["cache_hits"], refresh=False)
    counts = {
        "records": kept, "n": cfg.n, "generated": n_candidates, "kept": kept,
        "rejected": dict(sorted(rejected.items())), "malformed_replies": malformed,
        "task_requests": requests, "answer_requests": answer_requests, "rounds": rounds,
        "answers_hit_token_limit": truncated,
        "seed_tasks": len(seeds), "prompt_mode": mode,
        "stopped": "n_reached" if kept >= cfg.n else "max_requests",
        "teacher": gen.teacher_counts(),
    }
    gen.finish(counts, timer.seconds, inputs=[cfg.seed_tasks] if cfg.seed_tasks else None)
    return counts
