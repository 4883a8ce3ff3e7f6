"""`protege report`: one self-contained HTML page (+ report.md) putting style next to substance.

Reads any mix of folders (searched recursively): bench outputs (`results.json`), judge outputs
(`judge_results.json` + `judgments.jsonl`) and answer sets (`answers.jsonl`). One row per model
(base first, students, teacher last). Style columns: judge win rate against the teacher (ties count
half), mean answer length, stop rate (share of answers that ended their turn before the token budget;
a chat model that never stops is not a chat model), format adherence. Substance columns: each benchmark's primary metric.
The imitation gap of a model = its style gain minus its substance gain, both relative to the base;
a large positive gap is the "false promise": it *looks* more like the teacher without knowing more.

Trust: a judge run that failed its calibration (`calibration.py`) is marked not trustworthy and its win
rate gives no style gain. Judge-free style columns come from the answers themselves (`style.py`) and from
`teacher_nll.json` (teacher-likeness). Each benchmark score carries its 95% interval and, for chat models,
the plain-prompting score. The verdict at the top (`verdict`, `headline.py`) is computed from paired
intervals: style from the calibrated judge (else teacher NLL), substance as student − base with the same
(plain) prompting for both.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from string import Template
from typing import Any

from pydantic import Field

from ..config import StageConfig
from ..errors import StageError
from .answer import stop_counts
from .headline import Estimate, StyleShift, headline
from .intervals import paired_diff, paired_ratio_diff, stratified_ci
from .figures import png_base64
from .rl_report import collect_rl, rl_markdown, rl_section
from .style import style_measures

__all__ = ["ReportConfig", "run", "collect", "model_table"]

TEMPLATE = Path(__file__).with_name("report_template.html")


class ReportConfig(StageConfig):
    inputs: list[str] = Field(default_factory=list, description="bench / judge / answer / run folders")
    output: str = Field("report.html", description="HTML file to write; report.md goes next to it")
    base: str | None = Field(None, description="base model row (default: the first model that is not the teacher)")
    teacher: str | None = Field(None, description="teacher row (default: the usual opponent in pairwise judgments)")
    title: str = Field("protege evaluation report", description="page title")
    samples: int = Field(5, description="prompts shown with every model's answer side by side")


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
    for root in inputs:
        root_p = Path(root)
        if not root_p.exists():
            raise StageError(f"report input {root} not found")
        files = [root_p] if root_p.is_file() else sorted(root_p.rglob("*"))
        for f in files:
            if f.name == "results.json":
                r = _read_json(f)
                if "tasks" in r and "model_name" in r:
                    bench.setdefault(r["model_name"], {}).update(r["tasks"])
                    styles[r["model_name"]] = r.get("prompt_style", "plain")
                    if r.get("other_style"):
                        other.setdefault(r["model_name"], {}).update(r["other_style"]["tasks"])
                    order.append(r["model_name"])
            elif f.name == "judge_results.json":
                r = _read_json(f)
                rows = f.with_name("judgments.jsonl")
                r["judgments"] = [json.loads(x) for x in rows.read_text().splitlines() if x.strip()] \
                    if rows.exists() else []
                r["where"] = str(f.parent)
                judges.append(r)
                order.extend(r["models"])
            elif f.name == "rm_scores.json":
                r = _read_json(f)
                rm[r["model"]] = r
                order.append(r["model"])
            elif f.suffix in (".sqlite", ".db") and _is_arena(f):
                human = _human(f)
                order.extend(r["model"] for r in human["leaderboard"])
            elif f.name == "overoptimisation.json":
                rl_files.append(f)
            elif f.name == "answers.jsonl":
                recs = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
                if recs:
                    name = recs[0].get("model", f.parent.name)
                    answers.setdefault(name, recs)
                    order.append(name)
                    like = f.with_name("teacher_nll.json")
                    if like.exists():
                        likeness[name] = _read_json(like)
    models = list(dict.fromkeys(order))
    rl = collect_rl(rl_files)
    if not models and not rl:
        raise StageError(f"no results.json, judge_results.json, answers.jsonl, arena database or RL run "
                         f"(overoptimisation.json) under {', '.join(inputs)}")
    if human is not None:
        from ..arena.analysis import judge_agreement

        pairwise = [j["where"] for j in judges if j["mode"] == "pairwise"]
        human["agreement"] = judge_agreement(human["rows"], pairwise) if pairwise else None
    return {"bench": bench, "judges": judges, "answers": answers, "rm": rm, "models": models, "human": human,
            "styles": styles, "other_style": other, "likeness": likeness, "rl": rl}


def _is_arena(path: Path) -> bool:
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        ok = con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='votes'").fetchone() is not None
        con.close()
        return ok
    except sqlite3.Error:
        return False


def _human(path: Path) -> dict[str, Any]:
    """Human votes from a `protege arena` database: BT leaderboard with 95% intervals."""
    from ..arena.app import votes_of
    from ..arena.db import ArenaDB
    from ..arena.ratings import leaderboard

    db = ArenaDB(path)
    rows = db.votes()
    return {"where": str(path), "votes": len(rows), "rows": rows, "leaderboard": leaderboard(votes_of(db), rounds=100)}


def _human_section(human: dict[str, Any] | None) -> str:
    if not human:
        return "<p class=note>No human votes (run <code>protege arena</code> and add its database to the inputs).</p>"
    e = html.escape
    rows = "".join(f"<tr><td>{e(r['model'])}</td><td>{r['rating']:.0f}</td><td>[{r['ci_low']:.0f}, {r['ci_high']:.0f}]</td>"
                   f"<td>{r['battles']}</td><td>{_f(r['win_rate'])}</td></tr>" for r in human["leaderboard"])
    out = [f"<p>{human['votes']} votes from <code>{e(human['where'])}</code>; Bradley-Terry ratings (Elo scale) with "
           "bootstrap 95% intervals; ties count half.</p>",
           f"<table><tr><th>model</th><th>rating</th><th>95% interval</th><th>battles</th><th>win rate</th></tr>{rows}</table>"]
    a = human.get("agreement")
    if a:
        out.append(f"<p>Judge vs people on {a['pairs']} shared (prompt, pair) cells: agreement without ties "
                   f"{_f(a['agreement_without_ties'])} (n={a['decisive_pairs']}), Cohen's κ {_f(a['cohen_kappa'])}.</p>")
    return "".join(out)


def _pairwise_vs(judges: list[dict], model: str, teacher: str) -> dict[str, Any] | None:
    """Model's judge win rate against the teacher (ties half), from whichever side it was judged."""
    for j in judges:
        if j["mode"] != "pairwise" or set(j["models"]) != {model, teacher}:
            continue
        s = j["summary"]
        trusted = (j.get("trust") or {}).get("trustworthy")
        if j["models"][0] == model:
            return {"win_rate": s["win_rate"], "ci": s["win_rate_ci"], "n": s["n_judged"], "trusted": trusted}
        lo, hi = s["win_rate_ci"]
        return {"win_rate": 1 - s["win_rate"], "ci": (1 - hi, 1 - lo), "n": s["n_judged"], "trusted": trusted}
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


# ---- figures -----------------------------------------------------------------------------------

def _figures(table: dict[str, Any], judges: list[dict]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: list[tuple[str, str]] = []
    rows = table["rows"]
    colors = {"base": "#777777", "student": "#1f77b4", "teacher": "#d62728"}
    pts = [r for r in rows if not math.isnan(r["style"]) and not math.isnan(r["substance"])]
    if pts:
        fig, ax = plt.subplots(figsize=(5.2, 4))
        for r in pts:
            ax.scatter(r["substance"], r["style"], s=60, color=colors[r["role"]])
            ax.annotate(r["model"], (r["substance"], r["style"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel("substance: mean benchmark score")
        ax.set_ylabel("style: judge win rate vs teacher")
        ax.axhline(0.5, color="#ccc", lw=0.8, ls="--")
        ax.set_title("Style vs substance")
        figs.append(("Style vs substance. Up = the judge likes it more (vs the teacher); right = it knows more. "
                     "Imitation moves models up, not right.", png_base64(fig)))
    tasks = table["tasks"]
    if tasks:
        fig, ax = plt.subplots(figsize=(max(5.2, 1.3 * len(tasks) + 2), 4))
        width = 0.8 / max(len(rows), 1)
        for k, r in enumerate(rows):
            xs = [i + k * width for i in range(len(tasks))]
            ax.bar(xs, [r["scores"].get(t, float("nan")) for t in tasks], width, label=r["model"])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))])
        ax.set_xticklabels(tasks, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("score")
        ax.legend(fontsize=7)
        ax.set_title("Benchmark scores per task")
        figs.append(("Per-task substance scores (primary metric of each task).", png_base64(fig)))
    pair = [j for j in judges if j["mode"] == "pairwise"]
    if pair:
        metrics = ["position_consistency", "first_position_rate", "length_bias", "error_rate"]
        fig, ax = plt.subplots(figsize=(5.8, 4))
        width = 0.8 / len(pair)
        for k, j in enumerate(pair):
            s = j["summary"]
            ax.bar([i + k * width for i in range(len(metrics))], [s[m] for m in metrics], width,
                   label=" vs ".join(j["models"]))
        ax.axhline(0.5, color="#999", lw=0.8, ls="--")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(metrics))])
        ax.set_xticklabels(["position\nconsistency", "first position\nwins", "longer answer\nwins", "judge\nerrors"],
                           fontsize=8)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        ax.set_title(f"How far to trust the judge ({pair[0]['judge']})")
        figs.append(("Judge reliability: consistency across the two orders (1 = never swayed by position), how often "
                     "the first-shown answer wins and how often the longer one wins (0.5 = unbiased), errors.",
                     png_base64(fig)))
    return figs


# ---- rendering ---------------------------------------------------------------------------------

def _f(x: Any, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _signed(x: float) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "–"
    return f'<span class="{"pos" if x > 0 else "neg" if x < 0 else ""}">{x:+.3f}</span>'


def _judge_cell(j: dict | None) -> str:
    if not j:
        return "–"
    if j.get("self"):
        return "0.500 <span class=ci>(self)</span>"
    lo, hi = j["ci"]
    flag = " <span class=cut>not trustworthy</span>" if j.get("trusted") is False else ""
    return f"{_f(j['win_rate'])} <span class=ci>[{_f(lo, 2)}, {_f(hi, 2)}] n={j['n']}</span>{flag}"


def _score_cell(r: dict[str, Any], task: str) -> str:
    """Primary score [95% interval]; for a chat model also its plain-prompting score (format effects)."""
    if task not in r["scores"]:
        return "–"
    ci = r["ci"].get(task)
    out = _f(r["scores"][task]) + (f" <span class=ci>[{_f(ci[0], 2)}, {_f(ci[1], 2)}]</span>" if ci else "")
    if r["prompt_style"] == "chat" and task in r["plain_scores"]:
        out += f"<br><span class=ci>plain: {_f(r['plain_scores'][task])}</span>"
    return out


STYLE_COLUMNS = [("list_rate", "lists"), ("header_rate", "headers"), ("code_rate", "code blocks"),
                 ("repetition_rate", "degenerate repetition"), ("refusal_rate", "refusals")]


def _nll_cell(r: dict[str, Any]) -> str:
    t = r.get("teacher_nll")
    if not t or t.get("nll") is None:
        return "–"
    lo, hi = t["nll_ci"]
    return f"{_f(t['nll'])} <span class=ci>[{_f(lo, 2)}, {_f(hi, 2)}] n={t['n']}</span>"


def _stop_cell(r: dict[str, Any]) -> str:
    if not r["stop_n"]:
        return "–"
    return f"{_f(r['stop_rate'])} <span class=ci>n={r['stop_n']}</span>"


def _rm_cell(r: dict[str, Any]) -> str:
    rm = r.get("rm")
    if not rm:
        return "–"
    lo, hi = rm["ci"]
    return f"{_f(rm['mean'])} <span class=ci>[{_f(lo)}, {_f(hi)}] n={rm['n']}</span>"


def _headline_html(t: dict[str, Any]) -> str:
    hs = t.get("headlines") or {}
    if not hs:
        return ""
    items = "".join(f"<li><b>{html.escape(m)}</b>: {html.escape(' '.join(h['sentences']))}</li>" for m, h in hs.items())
    return ("<h2>Verdict</h2><ul class=headline>" + items + "</ul><p class=note>Computed from the table: paired "
            "95% bootstrap intervals over the same prompts / items; a change is claimed only where the interval "
            "excludes 0.</p>")


def _main_table(t: dict[str, Any]) -> str:
    e = html.escape
    with_rm = any(r.get("rm") for r in t["rows"])
    head = ("<tr><th class=name>model</th><th>role</th><th class=style>judge win rate vs teacher</th>"
            "<th class=style>teacher-answer NLL (nats/token)</th>"
            "<th class=style>mean answer length (chars)</th><th class=style>stop rate</th>"
            + "".join(f"<th class=style>{e(label)}</th>" for _, label in STYLE_COLUMNS)
            + "<th class=style>format adherence</th>" + ("<th class=style>reward model score</th>" if with_rm else "")
            + "".join(f"<th class=substance>{e(x)}</th>" for x in t["tasks"])
            + "<th class=substance>substance (mean)</th><th class=gap>style gain</th><th class=gap>substance gain</th>"
            "<th class=gap>imitation gap</th></tr>")
    body = ""
    for r in t["rows"]:
        body += (f"<tr><td class=name><a href='#samples'>{e(r['model'])}</a></td><td>{r['role']}</td>"
                 f"<td>{_judge_cell(r['judge'])}</td><td>{_nll_cell(r)}</td><td>{_f(r['mean_length'], 0)}</td>"
                 f"<td>{_stop_cell(r)}</td>"
                 + "".join(f"<td>{_f(r['style_measures'].get(k))}</td>" for k, _ in STYLE_COLUMNS)
                 + f"<td>{_f(r['format_adherence'])}</td>" + (f"<td>{_rm_cell(r)}</td>" if with_rm else "")
                 + "".join(f"<td>{_score_cell(r, x)}</td>" for x in t["tasks"])
                 + f"<td>{_f(r['substance'])} <span class=ci>[{_f(r['substance_ci'][0], 2)}, "
                 f"{_f(r['substance_ci'][1], 2)}]</span></td><td>{_signed(r['style_gain'])}</td>"
                 f"<td>{_signed(r['substance_gain'])}</td><td>{_signed(r['gap'])}</td></tr>")
    return f"<table id=models>{head}{body}</table>"


def _judge_section(judges: list[dict]) -> str:
    e = html.escape
    out = []
    for j in judges:
        s = j["summary"]
        if j["mode"] == "pairwise":
            a, b = j["models"]
            cells = "".join(f"<td>{_f(s[k])} <span class=ci>[{_f(s[k + '_ci'][0], 2)}, {_f(s[k + '_ci'][1], 2)}]"
                            f"</span></td>" for k in ("win", "tie", "loss"))
            out.append(f"<h3>{e(a)} vs {e(b)} (judge: {e(j['judge'])})</h3><table class=judge><tr><th>win</th>"
                       "<th>tie</th><th>loss</th><th>position consistency</th><th>first position wins</th>"
                       "<th>longer answer wins</th><th>judge errors</th><th>judged</th></tr>"
                       f"<tr>{cells}<td>{_f(s['position_consistency'])}</td><td>{_f(s['first_position_rate'])}</td>"
                       f"<td>{_f(s['length_bias'])}</td><td>{_f(s['error_rate'])}</td>"
                       f"<td>{s['n_judged']}/{s['n']}</td></tr></table>" + _calibration_html(j))
        else:
            rows = "".join(f"<tr><td class=name>{e(m)}</td><td>{_f(v['mean_rating'], 2)} <span class=ci>"
                           f"[{_f(v['mean_rating_ci'][0], 2)}, {_f(v['mean_rating_ci'][1], 2)}]</span></td>"
                           f"<td>{_f(v['length_rating_corr'], 2)}</td><td>{_f(v['error_rate'])}</td></tr>"
                           for m, v in s.items())
            out.append(f"<h3>{j['mode']} grading 1–10 (judge: {e(j['judge'])})</h3><table><tr><th class=name>model"
                       "</th><th>mean rating</th><th>length–rating correlation</th><th>judge errors</th></tr>"
                       f"{rows}</table>" + _calibration_html(j))
    return "\n".join(out) or "<p>No judge results given.</p>"


def _calibration_html(j: dict[str, Any]) -> str:
    """The judge's score on known-better pairs and whether it is trusted (see `calibration.py`)."""
    c, t = j.get("calibration"), j.get("trust") or {}
    how = f"verdicts: {j.get('verdicts', 'generate')}" + (
        f", {j['seconds_per_verdict']:.3f} s per verdict" if j.get("seconds_per_verdict") else "")
    if not c:
        return f"<p class=note>Not calibrated ({html.escape(how)}): its verdicts cannot be checked.</p>"
    kinds = ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in c["by_kind"].items())
    cons = "" if c.get("position_consistency") is None else f", position consistency {_f(c['position_consistency'])}"
    verdict = ("<b>trustworthy</b>" if t.get("trustworthy") else
               "<b class=neg>not trustworthy</b>: " + html.escape("; ".join(t.get("reasons", []))) +
               " — its verdicts are kept out of the headline")
    return (f"<p class=note>Calibration on {c['n_judged']} known-better pairs: accuracy {_f(c['accuracy'])} "
            f"[{_f(c['accuracy_ci'][0], 2)}, {_f(c['accuracy_ci'][1], 2)}] (ties half; chance 0.5){cons}; "
            f"by kind: {html.escape(kinds)}. {html.escape(how)}. Judge: {verdict}.</p>")


def _answer_cell(rec: dict[str, Any]) -> str:
    """A record's answers, turn by turn; an answer cut at the token budget is marked so it is not read as whole."""
    reasons = rec.get("finish_reasons") or []
    parts = [html.escape(a) + (" <span class=cut>[cut at max_new_tokens]</span>"
                               if k < len(reasons) and reasons[k] == "length" else "")
             for k, a in enumerate(rec["answers"])]
    return "\n---\n".join(parts)


def _samples(data: dict[str, Any], models: list[str], n: int) -> str:
    sets = {m: {r["id"]: r for r in data["answers"][m]} for m in models if m in data["answers"]}
    if not sets:
        for j in data["judges"]:  # fall back to the answers stored with pairwise judgments
            if j["mode"] == "pairwise":
                for k, m in enumerate(j["models"]):
                    sets.setdefault(m, {r["id"]: {"turns": r["turns"], "answers": r["answers"][k]}
                                        for r in j["judgments"]})
    if not sets:
        return "<p>No answers given.</p>"
    names = list(sets)
    ids = [i for i in next(iter(sets.values())) if all(i in s for s in sets.values())][:n]
    e = html.escape
    head = "<tr><th>prompt</th>" + "".join(f"<th>{e(m)}</th>" for m in names) + "</tr>"
    body = ""
    for i in ids:
        first = sets[names[0]][i]
        body += (f"<tr><td>{e(chr(10).join(first['turns']))}</td>"
                 + "".join(f"<td>{_answer_cell(sets[m][i])}</td>" for m in names)
                 + "</tr>")
    return f"<table class=samples>{head}{body}</table>"


def _markdown(cfg: ReportConfig, t: dict[str, Any], judges: list[dict]) -> str:
    with_rm = any(r.get("rm") for r in t["rows"])
    cols = ["model", "role", "judge win rate vs teacher", "teacher NLL", "mean length", "stop rate (n)",
            *[label for _, label in STYLE_COLUMNS], "format adherence",
            *(["RM score [95% CI]"] if with_rm else []), *t["tasks"], "substance [95% CI]", "imitation gap"]
    lines = [f"# {cfg.title}", ""]
    for model, h in t.get("headlines", {}).items():
        lines += [f"**{model}**: " + " ".join(h["sentences"]), ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in t["rows"]:
        j = r["judge"]
        jw = (_f(j["win_rate"]) + (" (not trustworthy)" if j.get("trusted") is False else "")) if j else "–"
        stop = f"{_f(r['stop_rate'])} ({r['stop_n']})" if r["stop_n"] else "–"
        rm = ([f"{_f(r['rm']['mean'])} [{_f(r['rm']['ci'][0])}, {_f(r['rm']['ci'][1])}]" if r.get("rm") else "–"]
              if with_rm else [])
        nll = _f((r.get("teacher_nll") or {}).get("nll"))

        def score(x: str) -> str:
            v = _f(r["scores"].get(x))
            ci = r["ci"].get(x)
            v += f" [{_f(ci[0], 2)}, {_f(ci[1], 2)}]" if ci else ""
            if r["prompt_style"] == "chat" and x in r["plain_scores"]:
                v += f" (plain {_f(r['plain_scores'][x])})"
            return v

        lines.append("| " + " | ".join([r["model"], r["role"], jw, nll, _f(r["mean_length"], 0), stop,
                                        *[_f(r["style_measures"].get(k)) for k, _ in STYLE_COLUMNS],
                                        _f(r["format_adherence"]), *rm, *[score(x) for x in t["tasks"]],
                                        f"{_f(r['substance'])} [{_f(r['substance_ci'][0], 2)}, {_f(r['substance_ci'][1], 2)}]",
                                        _f(r["gap"])]) + " |")
    for j in judges:
        s = j["summary"]
        if j["mode"] == "pairwise":
            c, tr = j.get("calibration"), j.get("trust") or {}
            cal = (f"; calibration accuracy {_f(c['accuracy'])} [{_f(c['accuracy_ci'][0], 2)}, "
                   f"{_f(c['accuracy_ci'][1], 2)}] on {c['n_judged']} known-better pairs: "
                   + ("trustworthy" if tr.get("trustworthy") else "NOT trustworthy (" + "; ".join(tr.get("reasons", [])) + ")")
                   if c else "; not calibrated")
            lines += ["", f"Judge {j['judge']} ({j.get('verdicts', 'generate')} verdicts): {' vs '.join(j['models'])}: "
                      f"win {_f(s['win'])} tie {_f(s['tie'])} loss {_f(s['loss'])}; position consistency "
                      f"{_f(s['position_consistency'])}; longer answer wins {_f(s['length_bias'])}; errors "
                      f"{_f(s['error_rate'])}{cal}"]
    return "\n".join(lines) + "\n"


def run(cfg: ReportConfig) -> dict[str, Any]:
    """Write the HTML report and report.md; returns their paths and the model count."""
    data = collect(cfg.inputs)
    t = model_table(data, cfg.base, cfg.teacher)
    figs = _figures(t, data["judges"])
    e = html.escape
    body = [f"<h1>{e(cfg.title)}</h1><p class=sub>base: {e(str(t['base']))} · teacher: {e(str(t['teacher']))}</p>",
            _headline_html(t), "<h2>Style vs substance</h2>", _main_table(t),
            "<p class=note>Style = judge win rate against the teacher (ties count half); substance = benchmark scores. "
            "Imitation gap = style gain − substance gain, both relative to the base. A model that copies the "
            "teacher's style without its knowledge has a large positive gap. Stop rate = share of the n answers "
            "that ended their turn on their own rather than being cut at the token budget.</p>",
            "<h2>Figures</h2>"]
    body += [f"<figure><img alt='figure' src='data:image/png;base64,{png}'><figcaption>{e(cap)}</figcaption></figure>"
             for cap, png in figs]
    body += [rl_section(data["rl"]), "<h2>Judge</h2>", _judge_section(data["judges"]), "<h2>People (blind A/B votes)</h2>",
             _human_section(data.get("human")),
             "<h2 id=samples>Sample answers side by side</h2>", _samples(data, [r["model"] for r in t["rows"]], cfg.samples)]
    page = Template(TEMPLATE.read_text(encoding="utf-8")).safe_substitute(title=e(cfg.title), body="\n".join(body))
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    md = out.with_name("report.md") if out.suffix == ".html" else out.with_suffix(".md")
    text = _markdown(cfg, t, data["judges"]) + rl_markdown(data["rl"])
    if data.get("human"):
        h = data["human"]
        text += "\n## People (blind A/B votes)\n\n| model | rating | 95% interval | battles | win rate |\n|---|---|---|---|---|\n"
        text += "".join(f"| {r['model']} | {r['rating']:.0f} | [{r['ci_low']:.0f}, {r['ci_high']:.0f}] | {r['battles']} | "
                        f"{_f(r['win_rate'])} |\n" for r in h["leaderboard"])
        a = h.get("agreement")
        if a:
            text += (f"\nJudge vs people: {a['pairs']} shared cells, agreement without ties {_f(a['agreement_without_ties'])} "
                     f"(n={a['decisive_pairs']}), Cohen's kappa {_f(a['cohen_kappa'])}.\n")
    md.write_text(text, encoding="utf-8")
    return {"html": str(out), "markdown": str(md), "models": len(t["rows"]), "figures": len(figs)}
