"""Reading what the stages wrote (bench, judge, answers, arena, RL runs) into one table per model, and the verdict."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import StageError
from ..evaluate.answer import ANSWERS_FILE, LIKENESS_FILE, read_answers, stop_counts
from ..evaluate.bench import RESULTS_FILE
from ..evaluate.headline import Estimate, StyleShift, headline
from ..evaluate.judge import JUDGE_RESULTS_FILE, JUDGMENTS_FILE
from ..evaluate.rm_score import RM_SCORES_FILE
from ..evaluate.intervals import paired_diff, paired_ratio_diff, stratified_ci
from ..evaluate.style import style_measures
from ..files import read_jsonl
from ..train.rl import OVEROPTIMISATION_FILE
from .pretrain import is_pretrain_manifest, read_pretrain
from .rl import collect_rl

__all__ = ["collect", "model_table", "verdict"]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise StageError(f"{path}: cannot read ({err})") from None


def collect(inputs: list[str]) -> dict[str, Any]:
    """Everything the report needs, gathered from the input folders."""
    bench: dict[str, dict[str, Any]] = {}
    judges: list[dict[str, Any]] = []
    answers: dict[str, list[dict[str, Any]]] = {}
    rm: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    human: dict[str, Any] | None = None
    styles: dict[str, str] = {}  # model -> prompt style of its bench scores
    other: dict[str, dict[str, Any]] = {}  # model -> task -> metrics under the other prompt style
    likeness: dict[str, dict[str, Any]] = {}  # model -> teacher_nll.json
    rl_files: list[Path] = []  # RS / PPO / GRPO over-optimisation histories
    pretraining: list[dict[str, Any]] = []  # from-scratch bases (train.pretrain manifests)
    for root in inputs:
        root_p = Path(root)
        if not root_p.exists():
            raise StageError(f"report input {root} not found")
        files = [root_p] if root_p.is_file() else sorted(root_p.rglob("*"))
        for f in files:
            if f.name == RESULTS_FILE:
                r = _read_json(f)
                if "tasks" in r and "model_name" in r:
                    bench.setdefault(r["model_name"], {}).update(r["tasks"])
                    styles[r["model_name"]] = r.get("prompt_style", "plain")
                    if r.get("other_style"):
                        other.setdefault(r["model_name"], {}).update(r["other_style"]["tasks"])
                    order.append(r["model_name"])
            elif f.name == JUDGE_RESULTS_FILE:
                r = _read_json(f)
                rows = f.with_name(JUDGMENTS_FILE)
                r["judgments"] = read_jsonl(rows, allow_nan=True) if rows.exists() else []
                r["where"] = str(f.parent)
                judges.append(r)
                order.extend(r["models"])
            elif f.name == RM_SCORES_FILE:
                r = _read_json(f)
                rm[r["model"]] = r
                order.append(r["model"])
            elif f.suffix in (".sqlite", ".db") and _is_arena(f):
                human = _human(f)
                order.extend(r["model"] for r in human["leaderboard"])
            elif f.name == "manifest.json" and (m := is_pretrain_manifest(f)) is not None:
                pretraining.append(read_pretrain(f, m))
            elif f.name == OVEROPTIMISATION_FILE:
                rl_files.append(f)
            elif f.name == ANSWERS_FILE:
                recs = read_answers(f)
                if recs:
                    name = recs[0].get("model", f.parent.name)
                    answers.setdefault(name, recs)
                    order.append(name)
                    like = f.with_name(LIKENESS_FILE)
                    if like.exists():
                        likeness[name] = _read_json(like)
    models = list(dict.fromkeys(order))
    rl = collect_rl(rl_files)
    if not models and not rl and not pretraining:
        raise StageError(f"no results.json, judge_results.json, answers.jsonl, arena database or RL run "
                         f"(overoptimisation.json) under {', '.join(inputs)}")
    if human is not None:
        from ..arena.analysis import judge_agreement

        pairwise = [j["where"] for j in judges if j["mode"] == "pairwise"]
        human["agreement"] = judge_agreement(human["rows"], pairwise) if pairwise else None
    return {"bench": bench, "judges": judges, "answers": answers, "rm": rm, "models": models, "human": human,
            "styles": styles, "other_style": other, "likeness": likeness, "rl": rl, "pretraining": pretraining}


def _is_arena(path: Path) -> bool:
    """A `protege arena` vote database (not, say, the teacher cache beside an answer set)."""
    from ..arena.db import ArenaDB

    return ArenaDB.schema_of(path)[1] is None


def _human(path: Path) -> dict[str, Any]:
    """Human votes from a `protege arena` database: BT leaderboard with 95% intervals."""
    from ..arena.app import votes_of
    from ..arena.db import ArenaDB
    from ..arena.ratings import leaderboard

    db = ArenaDB.existing(path)  # read-only: the report never writes to a vote database
    rows = db.votes()
    return {"where": str(path), "votes": len(rows), "rows": rows, "leaderboard": leaderboard(votes_of(db), rounds=100)}


def _pairwise_vs(judges: list[dict], model: str, teacher: str) -> dict[str, Any] | None:
    """Model's judge win rate against the teacher (ties half), from whichever side it was judged."""
    for j in judges:
        if j["mode"] != "pairwise" or set(j["models"]) != {model, teacher}:
            continue
        s = j["summary"]
        trusted = (j.get("trust") or {}).get("trustworthy")
        lc, lc_ci = s.get("lc_win_rate"), s.get("lc_win_rate_ci")  # absent in judge results written before it
        lc_raw = s.get("lc_raw_win_rate")
        if j["models"][0] == model:
            return {"win_rate": s["win_rate"], "ci": s["win_rate_ci"], "n": s["n_judged"], "trusted": trusted,
                    "lc": lc, "lc_ci": lc_ci, "lc_raw": lc_raw}
        lo, hi = s["win_rate_ci"]
        flip = (1 - lc_ci[1], 1 - lc_ci[0]) if lc_ci else None
        return {"win_rate": 1 - s["win_rate"], "ci": (1 - hi, 1 - lo), "n": s["n_judged"], "trusted": trusted,
                "lc": None if lc is None else 1 - lc, "lc_ci": flip, "lc_raw": None if lc_raw is None else 1 - lc_raw}
    return None


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def model_table(data: dict[str, Any], base: str | None, teacher: str | None) -> dict[str, Any]:
    """Rows (one per model) with style, substance and imitation-gap figures."""
    models, bench, judges = list(data["models"]), data["bench"], data["judges"]
    if teacher is None:
        opponents = [j["models"][1] for j in judges if j["mode"] == "pairwise"]
        teacher = max(set(opponents), key=opponents.count) if opponents else None
    if base is None:
        base = next((m for m in models if m != teacher), None)
    # base == teacher when each round is judged against its starting model (the llama2-chat recipe)
    ordered = ([base] if base in models else []) + [m for m in models if m not in (base, teacher)] + \
              ([teacher] if teacher in models and teacher != base else [])
    tasks = list(dict.fromkeys(t for m in ordered for t in bench.get(m, {})))
    rows = []
    for m in ordered:
        res = bench.get(m, {})
        judged = (_pairwise_vs(judges, m, teacher) if teacher and m != teacher else
                  ({"win_rate": 0.5, "ci": (0.5, 0.5), "n": 0, "self": True} if m == teacher else None))
        lengths = [len(a) for r in data["answers"].get(m, []) for a in r["answers"]]
        if not lengths:
            lengths = [j["mean_length"][m] for j in judges if m in j.get("mean_length", {})]
        stops = stop_counts(data["answers"].get(m, []))
        fmt = [r["format_adherence"] for r in res.values() if "format_adherence" in r]
        scores = {t: res[t]["score"] for t in tasks if t in res}
        style = data.get("styles", {}).get(m, "plain")
        plain_res = res if style == "plain" else data.get("other_style", {}).get(m, {})
        items = _items(res)
        trusted_judge = judged is not None and (judged.get("self") or judged.get("trusted") is not False)
        rows.append({"model": m, "role": "base" if m == base else "teacher" if m == teacher else "student",
                     "judge": judged, "mean_length": _nanmean([float(x) for x in lengths]),
                     "stop_rate": float("nan") if stops["stop_rate"] is None else stops["stop_rate"],
                     "stop_n": stops["stopped"] + stops["cut_at_max_tokens"],
                     "format_adherence": _nanmean(fmt), "scores": scores, "rm": data.get("rm", {}).get(m),
                     "ci": {t: res[t].get("ci") for t in tasks if t in res}, "prompt_style": style,
                     "plain_scores": {t: plain_res[t]["score"] for t in tasks if t in plain_res},
                     "items": items, "plain_items": _items(plain_res),
                     "substance": _nanmean(list(scores.values())),
                     "substance_ci": stratified_ci(items) if items else (float("nan"), float("nan")),
                     "style_measures": style_measures(data["answers"].get(m, [])),
                     "teacher_nll": data.get("likeness", {}).get(m),
                     "style": judged["win_rate"] if judged and trusted_judge else float("nan")})
    base_row = next((r for r in rows if r["role"] == "base"), None)
    for r in rows:
        if base_row is None:
            r["style_gain"] = r["substance_gain"] = r["gap"] = float("nan")
            continue
        r["style_gain"] = r["style"] - base_row["style"]
        r["substance_gain"] = r["substance"] - base_row["substance"]
        r["gap"] = r["style_gain"] - r["substance_gain"]
    table = {"rows": rows, "tasks": tasks, "base": base, "teacher": teacher}
    table["headlines"] = {r["model"]: verdict(data, table, r["model"]) for r in rows if r["role"] == "student"}
    return table


def _items(res: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {t: m["item_scores"] for t, m in res.items() if m.get("item_scores")}


def _judge_scores(judges: list[dict], model: str, teacher: str) -> tuple[dict[str, float], bool | None] | None:
    """Per-prompt outcome of `model` against the teacher (win 1, tie 0.5, loss 0) and the judge's trust."""
    for j in judges:
        if j["mode"] != "pairwise" or set(j["models"]) != {model, teacher} or not j.get("judgments"):
            continue
        first = j["models"][0] == model
        val = {"win": 1.0, "tie": 0.5, "loss": 0.0}
        out = {r["id"]: (val[r["outcome"]] if first else 1 - val[r["outcome"]])
               for r in j["judgments"] if r["outcome"] in val}
        return out, (j.get("trust") or {}).get("trustworthy")
    return None


def verdict(data: dict[str, Any], table: dict[str, Any], student: str) -> dict[str, Any]:
    """The headline for one student against the base: a style shift and a substance change, each a
    paired difference with a 95% interval (see `headline.py`)."""
    rows = {r["model"]: r for r in table["rows"]}
    base, teacher = table["base"], table["teacher"]
    if base not in rows or student not in rows:
        return {"sentences": [], "style": None, "substance": None}
    style = None
    against_base = bool(teacher) and teacher == base  # each round judged against the model it started from
    js = _judge_scores(data["judges"], student, teacher) if teacher else None
    if js and against_base:  # the base against itself is a tie on every prompt
        jb: tuple[dict[str, float], bool | None] | None = ({k: 0.5 for k in js[0]}, True)
    else:
        jb = _judge_scores(data["judges"], base, teacher) if teacher else None
    if js and jb and js[1] is True and jb[1] is True:
        d = paired_diff({"judge": js[0]}, {"judge": jb[0]})
        if d:
            est = Estimate(d["diff"], d["lo"], d["hi"])
            style = StyleShift(f"judge win rate against {base} (calibrated judge; {base} itself = 0.5)", est,
                               toward=f"was preferred to {base}", away=f"was judged worse than {base}") \
                if against_base else StyleShift("judge win rate against the teacher (calibrated judge)", est)
    if style is None:
        ls, lb = rows[student].get("teacher_nll"), rows[base].get("teacher_nll")
        if ls and lb and ls.get("per_item") and lb.get("per_item"):
            d = paired_ratio_diff(lb["per_item"], ls["per_item"])  # base NLL − student NLL: > 0 = closer
            if d:
                style = StyleShift("teacher-answer NLL reduction", Estimate(d["diff"], d["lo"], d["hi"]), " nats/token")
    s_items, b_items = rows[student]["plain_items"], rows[base]["plain_items"]
    note = "plain prompting for both"
    if not (s_items and b_items):
        s_items, b_items = rows[student]["items"], rows[base]["items"]
        note = f"{rows[student]['prompt_style']} vs {rows[base]['prompt_style']} prompting"
    d = paired_diff(s_items, b_items)
    substance = Estimate(d["diff"], d["lo"], d["hi"]) if d else None
    if substance is not None and rows[student]["prompt_style"] == "chat" and note.startswith("plain"):
        chat = paired_diff(rows[student]["items"], b_items)
        if chat:
            note += f"; with its chat format {student} − {base} = {Estimate(chat['diff'], chat['lo'], chat['hi']).text()}"
    return {"sentences": headline(student, base, style, substance, note),
            "style": None if style is None else {"measure": style.measure, "value": style.delta.value,
                                                  "ci": (style.delta.lo, style.delta.hi)},
            "substance": None if substance is None else {"value": substance.value, "ci": (substance.lo, substance.hi),
                                                         "items": d["items"] if d else 0, "note": note}}
