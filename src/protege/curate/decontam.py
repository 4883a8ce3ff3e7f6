"""`decontaminate`: drop training records whose prompts overlap evaluation prompts.

Three tests, cheapest first, each against an index built once over the eval prompts:
- exact: same normalized text;
- n-gram: a shared word 13-gram (GPT-3 / lm-eval-harness convention); an eval prompt shorter
  than 13 words but at least `min_words` long matches when it appears whole;
- BLEU: sentence BLEU (sacrebleu, hypothesis = training prompt, reference = eval prompt) at or
  above the threshold (Koala removed test queries with BLEU > 20 against training data).

BLEU is only computed for candidate pairs that share a word trigram, found through a trigram
index, instead of for all (train x eval) pairs. Why that loses nothing in practice: without a
shared trigram the 3- and 4-gram precisions fall to sacrebleu's smoothing floor (1/(2*len) and
1/(4*len)), and even perfect unigram/bigram precision then gives BLEU < 20 for prompts of 6+
words. Trigrams found in more than 1% of eval items (and 50+) are not used to find candidates:
shared boilerplate ("what is the") alone cannot lift BLEU to the threshold.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from ..errors import StageError
from ..files import json_lines
from ..formats import convert_obj
from ..records import Record, RecordError
from .common import Context, StepResult, messages_of, normalize, progress, removal, texts, words
from .config import DecontaminateStep

__all__ = ["EvalPrompt", "load_eval_prompts", "EvalIndex", "apply"]

_LIST_KEYS = ("examples", "data", "items", "questions", "instances", "test")


@dataclass
class EvalPrompt:
    eval_set: str
    item_id: str
    text: str


def _objects(path: Path) -> Iterator[tuple[int, Any]]:
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data = next((data[k] for k in _LIST_KEYS if isinstance(data.get(k), list)), None)
        if not isinstance(data, list):
            raise StageError(f"{path}: expected a list of items (or an object with one of {', '.join(_LIST_KEYS)})")
        yield from enumerate(data, start=1)
        return
    yield from json_lines(path)


def eval_set_file(ref: str | Path) -> Path:
    """The items file of an eval set: a records/task JSONL or JSON file, a task YAML, or a built-in task's name
    (`arithmetic`: works from a wheel install, where the package's files have no repository path)."""
    from ..tasks import builtin_tasks, resolve_task

    path = Path(ref)
    if path.exists() and path.suffix not in (".yaml", ".yml"):
        return path
    if path.suffix in (".yaml", ".yml") or str(ref) in builtin_tasks():
        spec = resolve_task(str(ref))
        if spec.data.startswith("hf:"):
            raise StageError(f"eval set {ref}: task {spec.name} reads a hub dataset ({spec.data}); give its items "
                             "as a local file to decontaminate against")
        return spec.path(spec.data)
    raise FileNotFoundError(f"{ref}: eval set not found (a records or task file, a task YAML, or a built-in task: "
                            f"{', '.join(builtin_tasks())})")


def load_eval_prompts(path: str | Path, fields: list[str]) -> list[EvalPrompt]:
    """Eval prompts of a records file (user turns) or a task file (first of `fields` present)."""
    path = eval_set_file(path)
    out: list[EvalPrompt] = []
    for lineno, obj in _objects(path):
        if not isinstance(obj, dict):
            raise StageError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        base = str(obj.get("id") or obj.get("question_id") or obj.get("task_id") or lineno)
        if any(k in obj for k in ("messages", "conversations", "chosen")):
            try:
                rec = convert_obj(obj)
            except RecordError as err:
                raise StageError(f"{path}:{lineno}: {err.problem}") from None
            users = [m["content"] for m in messages_of(rec) if m["role"] == "user"]
            out += [EvalPrompt(path.name, f"{base}#{k}" if len(users) > 1 else base, u) for k, u in enumerate(users, 1)]
            continue
        value = next((obj[f] for f in fields if obj.get(f)), None)
        if isinstance(value, str):
            out.append(EvalPrompt(path.name, base, value))
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):  # MT-bench `turns`
            out += [EvalPrompt(path.name, f"{base}#{k}", v) for k, v in enumerate(value, 1)]
        else:
            raise StageError(f"{path}:{lineno}: no eval prompt: expected a string field among "
                             f"{', '.join(fields)} (set `fields`), or messages/conversations")
    return out


class EvalIndex:
    """Exact, n-gram and trigram indexes over eval prompts."""

    def __init__(self, prompts: list[EvalPrompt], ngram: int = 13, min_words: int = 8):
        self.prompts, self.ngram = prompts, ngram
        self.exact: dict[str, int] = {}
        self.grams: dict[int, list[int]] = defaultdict(list)     # hash(word n-gram) -> eval indices
        self.lengths: set[int] = {ngram}                         # n-gram sizes to look up
        tri: dict[int, set[int]] = defaultdict(set)
        self.words = [words(p.text) for p in prompts]
        for i, w in enumerate(self.words):
            self.exact.setdefault(normalize(prompts[i].text), i)
            n = ngram if len(w) >= ngram else (len(w) if len(w) >= min_words else 0)
            if n:
                self.lengths.add(n)
                for g in {hash(tuple(w[k:k + n])) for k in range(len(w) - n + 1)}:
                    self.grams[g].append(i)
            for k in range(len(w) - 2):
                tri[hash(tuple(w[k:k + 3]))].add(i)
        max_df = max(50, len(prompts) // 100)
        self.trigrams = {g: s for g, s in tri.items() if len(s) <= max_df}

    def ngram_hits(self, text: str) -> set[int]:
        w = words(text)
        hits: set[int] = set()
        for n in self.lengths:
            for k in range(len(w) - n + 1):
                found = self.grams.get(hash(tuple(w[k:k + n])))
                if found:
                    hits.update(i for i in found if n == self.ngram or len(self.words[i]) == n)
        return hits

    def bleu_candidates(self, text: str) -> set[int]:
        w = words(text)
        out: set[int] = set()
        for k in range(len(w) - 2):
            out |= self.trigrams.get(hash(tuple(w[k:k + 3])), set())
        return out


def _bleu():
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=True)


def _stamp(path: str) -> tuple[int, int]:
    """Size and mtime of an eval-set file (a built-in task name has none): the index is rebuilt when they change."""
    try:
        st = Path(path).stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return 0, 0


@lru_cache(maxsize=4)
def _eval_index(eval_sets: tuple[str, ...], fields: tuple[str, ...], ngram: int, min_words: int,
                stamps: tuple[tuple[int, int], ...]) -> tuple[list[Any], "EvalIndex"]:
    """The eval prompts and their index, built once per process for the chunks a stream brings."""
    prompts = [p for path in eval_sets for p in load_eval_prompts(path, list(fields))]
    return prompts, EvalIndex(prompts, ngram, min_words)


def apply(records: list[Record], opts: DecontaminateStep, ctx: Context | None = None) -> StepResult:
    """Remove records overlapping any eval prompt; stats list every hit and hits per eval set."""
    if not opts.eval_sets:
        raise StageError("decontaminate: no `eval_sets` given (eval task or records files to check against)")
    prompts, index = _eval_index(tuple(opts.eval_sets), tuple(opts.fields), opts.ngram, opts.min_words,
                                 tuple(_stamp(p) for p in opts.eval_sets))
    bleu = _bleu() if opts.bleu_threshold is not None else None
    kept, removed, hits = [], [], []
    for rec in progress(records, "decontaminate"):
        hit = None
        for text in texts(rec, opts.scope):
            i = index.exact.get(normalize(text))
            if i is not None:
                hit = (i, "exact", 100.0)
                break
            found = index.ngram_hits(text)
            if found:
                hit = (min(found), f"{opts.ngram}-gram", 100.0)
                break
        if hit is None and bleu is not None:
            for text in texts(rec, "user"):
                scored = [(bleu.sentence_score(text, [prompts[i].text]).score, i) for i in sorted(index.bleu_candidates(text))]
                best = max(scored, default=(0.0, -1))
                if best[0] >= opts.bleu_threshold:
                    hit = (best[1], "bleu", round(best[0], 1))
                    break
        if hit is None:
            kept.append(rec)
            continue
        p = prompts[hit[0]]
        how = f"BLEU {hit[2]}" if hit[1] == "bleu" else f"{hit[1]} match"
        removed.append(removal(rec, "contamination", f"{how} with {p.eval_set}:{p.item_id}"))
        hits.append({"train_id": rec.id, "eval_set": p.eval_set, "eval_id": p.item_id, "method": hit[1],
                     "score": hit[2], "eval_text": p.text[:200]})
    per_set = Counter(p.eval_set for p in prompts)
    hit_items = {(h["eval_set"], h["eval_id"]) for h in hits}
    stats = {"contamination_hits": hits,
             "eval_sets": {s: {"prompts": n, "prompts_hit": sum(1 for e, _ in hit_items if e == s)}
                           for s, n in per_set.items()}}
    return StepResult(kept, removed, stats=stats)
