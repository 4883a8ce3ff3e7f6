"""`protege eval judge`: an LLM judge that reports its own biases next to its verdicts.

Modes
- pairwise: the judge compares model A's and model B's answers to the same prompt, asked in BOTH
  orders. Generated verdicts: agreeing orders give the verdict, disagreeing orders are a tie. Log-prob
  verdicts: the probability that model 1 is better, averaged over both orders, decides (`tie_margin`).
- single: the judge grades each answer 1-10.
- reference: single grading against the prompt's reference answer (prompts without one are skipped).
Verdicts: a local judge's pairwise verdicts are read from its next-token probabilities after "Verdict:"
(`verdicts: logprob`, the default for local judges): one forward per order, never unparseable, and a
probability per pair. API judges generate text (`verdicts: generate`); unparseable replies are asked once
more (sampled, so a cached greedy reply is not just replayed), then counted as judge errors.

Calibration (every run, `calibration` pairs): the judge also compares answer pairs whose better answer is
known by construction (`calibration.py`). Its accuracy there and its position consistency are stored with
the verdicts; a judge under `min_calibration_accuracy` (or whose interval reaches chance), or, with
generated verdicts, under `min_position_consistency`, is marked not trustworthy, and the report keeps it
out of the headline. Every figure that says how far to trust the judge is reported: position
consistency (share of pairs whose two orders agree), first-position rate, length bias (how often the
longer answer wins), error rate, and bootstrap 95% intervals on the win/tie/loss rates.

Inputs are answer sets (`protege eval answer` output), or model specs answered on the fly from `prompts`.
Output: judgments.jsonl (one line per prompt, raw judge replies included), calibration.jsonl,
judge_results.json (summary, calibration, trust) + manifest.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

from pydantic import Field

from ..config import MaxNewTokens, StageConfig
from ..errors import StageError
from ..manifest import StageRun
from ..models import DEFAULT_JUDGE
from ..records import write_records
from ..teachers import TeacherConfig
from .answer import ANSWERS_FILE, AnswerConfig, display_name, read_answers
from .intervals import bootstrap_ci
from .verdicts import (order_outcome, p_first, pairwise_messages, pairwise_summary, parse_pairwise,
                       parse_rating, single_messages, verdict_probs)

if TYPE_CHECKING:
    from ..teachers import Teacher

__all__ = ["JudgeConfig", "run", "JUDGE_RESULTS_FILE", "JUDGMENTS_FILE"]

JUDGE_RESULTS_FILE = "judge_results.json"
JUDGMENTS_FILE = "judgments.jsonl"

class JudgeConfig(StageConfig):
    mode: Literal["pairwise", "single", "reference"] = Field("pairwise", description="pairwise (both orders), "
                                                             "single 1-10 grading, or reference-guided grading")
    answers: list[str] = Field(..., description="answer sets (answers.jsonl or its folder) or model specs to "
                               "answer `prompts` first; pairwise takes two: the candidate, then its opponent")
    prompts: str | None = Field(None, description="prompt set, needed when `answers` names models")
    judge: TeacherConfig = Field(default_factory=lambda: TeacherConfig(model=DEFAULT_JUDGE),
                                 description="the judge (any teacher backend); the default is the built-in judge "
                                 "that passes calibration (see benchmarks/judge_candidates.py)")
    out_dir: str = Field("runs/eval/judge", description="output folder")
    limit: int | None = Field(None, description="judge at most this many prompts")
    max_new_tokens: MaxNewTokens = Field(96, description="judge reply budget (the verdict comes first)")
    answer_max_new_tokens: MaxNewTokens = Field(256, description="answer budget when answering `prompts` here")
    max_answer_chars: int = Field(3000, description="answers longer than this are cut (marked) in the judge "
                                  "prompt, so a rambling model cannot overflow the judge's context")
    use_reference: bool = Field(True, description="pairwise: show the reference answer when the prompt has one")
    per_turn: bool = Field(True, description="single/reference: grade each turn of a multi-turn prompt on its own, "
                           "in the context of the model's earlier answers (MT-bench); false: one grade per dialogue")
    verdicts: Literal["auto", "logprob", "generate"] = Field(
        "auto", description="pairwise verdicts from the judge's next-token probabilities (logprob: local judges) "
        "or from generated text (generate); auto = logprob when the judge can be scored")
    tie_margin: float = Field(0.02, ge=0, le=0.5, description="log-prob verdicts: a pair whose order-averaged "
                              "probability is within this of 0.5 is a tie")
    calibration: int = Field(48, ge=0, description="known-answer calibration pairs judged with the real "
                             "verdicts (both orders); 0 = skip")
    min_calibration_accuracy: float = Field(0.75, description="below this calibration accuracy (ties half) "
                                            "the judge is marked not trustworthy")
    min_position_consistency: float = Field(0.5, description="pairwise, generated verdicts: below this share of "
                                            "order-consistent calibration verdicts the judge is marked not "
                                            "trustworthy (log-prob verdicts average both orders, so a position "
                                            "bias is reported but cancelled)")
    bootstrap_iters: int = Field(1000, description="bootstrap resamples for the 95% intervals")
    seed: int = Field(0, description="seed of the retry sampling and the bootstrap")


def _load_answer_set(entry: str, cfg: JudgeConfig, out: Path) -> list[dict[str, Any]]:
    from . import answer

    p = Path(entry)
    if (p.is_dir() and (p / ANSWERS_FILE).exists()) or (p.is_file() and p.suffix == ".jsonl"):
        return read_answers(p)
    if cfg.prompts is None:
        raise StageError(f"{entry!r} is not an answers file/folder; to answer with it as a model, set `prompts`")
    name = display_name(entry)
    target = out / "answers" / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    answer.run(AnswerConfig(model=entry, model_name=name, prompts=cfg.prompts, out_dir=str(target),
                            limit=cfg.limit, max_new_tokens=cfg.answer_max_new_tokens,
                            batch_size=cfg.judge.max_batch_size))
    return read_answers(target)


def _ask(teacher: Teacher, convs: list[list[dict[str, str]]], parse: Any, cfg: JudgeConfig) -> list[tuple[Any, str, bool]]:
    """(parsed verdict or None, raw reply, retried) per conversation; unparseable ones asked once more."""
    from ..engine import SamplingParams

    greedy = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0)
    replies = [r.text for r in teacher.complete(convs, greedy, progress=True)]
    results = [(parse(t), t, False) for t in replies]
    redo = [i for i, (v, _, _) in enumerate(results) if v is None]
    if redo:  # sampled, so the retry is a new request rather than the cached greedy reply
        again = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.7, top_p=0.95, seed=cfg.seed + 1)
        for i, r in zip(redo, teacher.complete([convs[i] for i in redo], again, progress=True)):
            results[i] = (parse(r.text), replies[i] + "\n--- retry ---\n" + r.text, True)
    return results


def _ask_pairwise(teacher: Teacher, convs: list[list[dict[str, str]]], cfg: JudgeConfig,
                  logprob: bool) -> list[tuple[str | None, str, bool, dict[str, float] | None]]:
    """(verdict, raw, retried, {"A","B","tie"} probabilities or None) per pairwise conversation."""
    if not logprob:
        return [(v, t, r, None) for v, t, r in _ask(teacher, convs, parse_pairwise, cfg)]
    return [(max(p, key=p.__getitem__), "log-prob verdict: " + " ".join(f"{k}={v:.3f}" for k, v in p.items()), False, p)
            for p in verdict_probs(teacher, convs)]


def _aligned(sets: list[list[dict[str, Any]]], limit: int | None) -> list[list[dict[str, Any]]]:
    """The prompts every answer set has, in the first set's order."""
    by_id = [{r["id"]: r for r in s} for s in sets]
    ids = [r["id"] for r in sets[0] if all(r["id"] in b for b in by_id[1:])]
    if not ids:
        raise StageError("the answer sets share no prompt ids; were they made from the same prompt file?")
    ids = ids[:limit] if limit else ids
    return [[b[i] for b in by_id] for i in ids]


def _clip(answers: Sequence[str], limit: int) -> list[str]:
    return [a if len(a) <= limit else a[:limit] + " [... cut]" for a in answers]


def _length(rec: dict[str, Any]) -> int:
    return sum(len(a) for a in rec["answers"])


def _pearson(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 3:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sx = sum((x - mx) ** 2 for x in xs) ** 0.5
    sy = sum((y - my) ** 2 for y in ys) ** 0.5
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (sx * sy) if sx and sy else float("nan")


def _run_pairwise(teacher: Teacher, groups: list[list[dict]], cfg: JudgeConfig,
                  logprob: bool) -> tuple[list[dict], dict]:
    convs = []
    for a, b in groups:
        ref = a.get("reference") if cfg.use_reference else None
        aa, bb = _clip(a["answers"], cfg.max_answer_chars), _clip(b["answers"], cfg.max_answer_chars)
        convs.append(pairwise_messages(a["turns"], aa, bb, ref))
        convs.append(pairwise_messages(a["turns"], bb, aa, ref))
    asked = _ask_pairwise(teacher, convs, cfg, logprob)
    rows = []
    for k, (a, b) in enumerate(groups):
        (v1, t1, r1, p1), (v2, t2, r2, p2) = asked[2 * k], asked[2 * k + 1]
        pw = p_first(p1, p2)
        row = {"id": a["id"], "category": a.get("category", ""), "turns": a["turns"],
               "answers": [a["answers"], b["answers"]], "length": [_length(a), _length(b)],
               "verdicts": [v1, v2], "outcome": order_outcome(v1, v2, pw, cfg.tie_margin), "raw": [t1, t2],
               "retried": [r1, r2]}
        if p1 is not None:
            row["probs"], row["p_win"] = [p1, p2], pw
        rows.append(row)
    summary = pairwise_summary(rows, cfg.bootstrap_iters, cfg.seed)
    scored = [{**r, "score": 1.0 if r["outcome"] == "win" else 0.5 if r["outcome"] == "tie" else 0.0}
              for r in rows if r["outcome"] != "error"]
    summary["per_category"] = _means_by(scored, "category", "score")  # win rate (ties half) per category
    probs = [r["p_win"] for r in rows if r.get("p_win") is not None]
    if probs:
        summary["mean_p_win"] = sum(probs) / len(probs)
        summary["mean_p_win_ci"] = bootstrap_ci(probs, cfg.bootstrap_iters, cfg.seed)
    return rows, summary


def _run_calibration(teacher: Teacher, cfg: JudgeConfig, logprob: bool) -> list[dict[str, Any]]:
    """Known-answer pairs through the same verdict path as the real ones (see `calibration.py`)."""
    from .calibration import calibration_pairs

    pairs = calibration_pairs(cfg.calibration, cfg.seed)
    if not pairs:
        return []
    with _shared_cache(teacher, cfg):
        return _calibration_rows(teacher, cfg, logprob, pairs)


@contextlib.contextmanager
def _shared_cache(teacher: Teacher, cfg: JudgeConfig) -> Iterator[None]:
    """Calibration verdicts of a built-in (sha256-pinned) judge are the same in every run: keep them in
    one cache under PROTEGE_HOME, so a recipe's second judge stage (and every later run) reuses them."""
    from ..models import ALIASES, protege_home
    from ..teachers.cache import ResponseCache

    own = getattr(teacher, "cache", None)
    if cfg.judge.backend != "local" or cfg.judge.model not in ALIASES or own is None:
        yield
        return
    shared = ResponseCache(protege_home() / "judge_calibration.sqlite")
    teacher.cache = shared
    try:
        yield
    finally:
        teacher.cache = own
        shared.close()


def _calibration_rows(teacher: Teacher, cfg: JudgeConfig, logprob: bool, pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    if cfg.mode == "pairwise":
        convs = []
        for p in pairs:
            convs.append(pairwise_messages(p["turns"], [p["good"]], [p["bad"]]))
            convs.append(pairwise_messages(p["turns"], [p["bad"]], [p["good"]]))
        asked = _ask_pairwise(teacher, convs, cfg, logprob)
        for k, p in enumerate(pairs):
            (v1, t1, _, p1), (v2, t2, _, p2) = asked[2 * k], asked[2 * k + 1]
            pg = p_first(p1, p2)
            rows.append({**p, "verdicts": [v1, v2], "outcome": order_outcome(v1, v2, pg, cfg.tie_margin), "raw": [t1, t2],
                         "p_good": pg})
        return rows
    convs = [single_messages(p["turns"], [ans]) for p in pairs for ans in (p["good"], p["bad"])]
    asked = _ask(teacher, convs, parse_rating, cfg)
    for k, p in enumerate(pairs):
        (g, tg, _), (b, tb, _) = asked[2 * k], asked[2 * k + 1]
        outcome = "error" if g is None or b is None else "win" if g > b else "loss" if g < b else "tie"
        rows.append({**p, "ratings": [g, b], "verdicts": [None, None], "outcome": outcome, "raw": [tg, tb]})
    return rows


def _use_logprob(cfg: JudgeConfig, teacher: Teacher) -> bool:
    if cfg.mode != "pairwise" or cfg.verdicts == "generate":
        return False  # 1-10 grades are generated: "10" is not one token, and grades are not a 3-way choice
    scorable = bool(getattr(teacher, "scores_choices", False))
    if cfg.verdicts == "logprob" and not scorable:
        raise StageError(f"verdicts: logprob needs a local judge; {teacher.name} cannot be scored "
                         "(use verdicts: generate)")
    return scorable


def _run_single(teacher: Teacher, groups: list[list[dict]], names: list[str], cfg: JudgeConfig) -> tuple[list, dict]:
    use_ref = cfg.mode == "reference"
    if use_ref:
        groups = [g for g in groups if g[0].get("reference")]
        if not groups:
            raise StageError("reference mode: none of the prompts has a `reference` answer")
    # MT-bench grades each turn of a multi-turn prompt on its own, in the context of the model's own earlier
    # answers; `per_turn: false` grades the whole dialogue once.
    jobs = [(g, rec, turn) for g in groups for rec in g
            for turn in (range(1, len(g[0]["turns"]) + 1) if cfg.per_turn and len(g[0]["turns"]) > 1 else [None])]
    convs = [single_messages(g[0]["turns"], _clip(rec["answers"], cfg.max_answer_chars),
                             g[0].get("reference") if use_ref else None, turn) for g, rec, turn in jobs]
    asked = iter(_ask(teacher, convs, parse_rating, cfg))
    model_of = {id(rec): name for g in groups for name, rec in zip(names, g)}
    rows = []
    for g, rec, turn in jobs:
        rating, raw, retried = next(asked)
        rows.append({"id": rec["id"], "model": model_of[id(rec)], "category": rec.get("category", ""),
                     "turn": turn or 0, "turns": rec["turns"], "answers": rec["answers"], "rating": rating,
                     "raw": raw, "retried": retried,
                     "length": len(rec["answers"][turn - 1]) if turn else _length(rec)})
    summary = {}
    for name in names:
        mine = [r for r in rows if r["model"] == name]
        ok = [r for r in mine if r["rating"] is not None]
        ratings = [r["rating"] for r in ok]
        summary[name] = {"n": len(mine), "n_judged": len(ok), "error_rate": 1 - len(ok) / len(mine),
                         "mean_rating": sum(ratings) / len(ratings) if ratings else float("nan"),
                         "mean_rating_ci": bootstrap_ci(ratings, cfg.bootstrap_iters, cfg.seed),
                         "length_rating_corr": _pearson([float(r["length"]) for r in ok], ratings),
                         "mean_length": sum(r["length"] for r in mine) / len(mine),
                         "per_turn": _means_by(ok, "turn", "rating"), "per_category": _means_by(ok, "category", "rating")}
    return rows, summary


def _means_by(rows: list[dict[str, Any]], key: str, value: str) -> dict[str, dict[str, float]]:
    """{group: {"mean", "n"}} of `value` over rows grouped by `key` (turn 0 = the whole dialogue)."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(str(r[key]), []).append(float(r[value]))
    return {k: {"mean": sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())}


def run(cfg: JudgeConfig, teacher: Teacher | None = None) -> dict[str, Any]:
    """Judge the answer sets; writes judgments.jsonl, calibration.jsonl, judge_results.json and
    manifest.json into `out_dir`. `teacher`: an already built judge (default: from `cfg.judge`)."""
    from ..teachers import make_teacher
    from .calibration import calibration_summary, trust_verdict

    if cfg.mode == "pairwise" and len(cfg.answers) != 2:
        raise StageError(f"pairwise judging compares exactly two answer sets, got {len(cfg.answers)}")
    stage = StageRun(f"eval-judge-{cfg.mode}", cfg, cfg.out_dir)
    out = stage.out
    sets = [_load_answer_set(e, cfg, out) for e in cfg.answers]
    names = [s[0].get("model") or display_name(e) if s else display_name(e) for s, e in zip(sets, cfg.answers)]
    if len(set(names)) != len(names):
        names = [f"{n}#{i + 1}" for i, n in enumerate(names)]
    groups = _aligned(sets, cfg.limit)
    own = teacher is None
    teacher = make_teacher(cfg.judge, cache_dir=out) if own else teacher
    logprob = _use_logprob(cfg, teacher)
    try:
        t_verdicts = time.perf_counter()
        if cfg.mode == "pairwise":
            rows, summary = _run_pairwise(teacher, groups, cfg, logprob)
        else:
            rows, summary = _run_single(teacher, groups, names, cfg)
        t_verdicts = time.perf_counter() - t_verdicts
        cal_rows = _run_calibration(teacher, cfg, logprob)
    finally:
        if own:
            teacher.close()
    calib = calibration_summary(cal_rows, cfg.bootstrap_iters, cfg.seed) if cal_rows else None
    trust = (trust_verdict(calib, cfg.min_calibration_accuracy,
                           cfg.min_position_consistency if cfg.mode == "pairwise" and not logprob else None)
             if calib is not None else {"trustworthy": None, "reasons": ["not calibrated (calibration: 0)"]})
    mean_len = {n: sum(_length(g[i]) for g in groups) / len(groups) for i, n in enumerate(names)}
    n_verdicts = len(rows) * (2 if cfg.mode == "pairwise" else 1)
    results = {"mode": cfg.mode, "judge": cfg.judge.model, "verdicts": "logprob" if logprob else "generate",
               "models": names, "mean_length": mean_len, "summary": summary, "calibration": calib, "trust": trust,
               "seconds_per_verdict": round(t_verdicts / n_verdicts, 4) if n_verdicts else None,
               "seconds": round(stage.seconds, 2)}
    write_records(out / JUDGMENTS_FILE, rows)
    write_records(out / "calibration.jsonl", cal_rows)
    (out / JUDGE_RESULTS_FILE).write_text(json.dumps(results, indent=2), encoding="utf-8")
    inputs = [e for e in cfg.answers if Path(e).exists()] + ([cfg.prompts] if cfg.prompts else [])
    stage.finish(inputs=inputs, outputs=[out / JUDGMENTS_FILE, out / "calibration.jsonl", out / JUDGE_RESULTS_FILE],
                 counts={"prompts": len(groups), "judgments": len(rows)})
    return results
