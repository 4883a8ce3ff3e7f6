"""The report's HTML sections, figures and Markdown, drawn from `collect.model_table`'s table."""

from __future__ import annotations

import html
import math
from typing import Any

from ..figures import png_base64, pyplot

__all__ = ["figures", "main_table", "headline_html", "judge_section", "human_section", "samples", "markdown",
           "human_markdown"]


# ---- figures -----------------------------------------------------------------------------------

def figures(table: dict[str, Any], judges: list[dict]) -> list[tuple[str, str]]:
    plt = pyplot()
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
    lc = ""
    if j.get("lc") is not None and j.get("lc_ci") and j["lc"] == j["lc"]:  # absent or NaN (< 2 prompts): not shown
        llo, lhi = j["lc_ci"]
        raw = j.get("lc_raw")  # the same (probability) targets without the length term: what LC moves from
        lc = (f"<br>LC {_f(j['lc'])} <span class=ci>[{_f(llo, 2)}, {_f(lhi, 2)}] at equal length"
              + (f"; {_f(raw)} without the length term" if raw is not None else "") + "</span>")
    return f"{_f(j['win_rate'])} <span class=ci>[{_f(lo, 2)}, {_f(hi, 2)}] n={j['n']}</span>{flag}{lc}"


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


def headline_html(t: dict[str, Any]) -> str:
    hs = t.get("headlines") or {}
    if not hs:
        return ""
    items = "".join(f"<li><b>{html.escape(m)}</b>: {html.escape(' '.join(h['sentences']))}</li>" for m, h in hs.items())
    return ("<h2>Verdict</h2><ul class=headline>" + items + "</ul><p class=note>Computed from the table: paired "
            "95% bootstrap intervals over the same prompts / items; a change is claimed only where the interval "
            "excludes 0.</p>")


def main_table(t: dict[str, Any]) -> str:
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


def judge_section(judges: list[dict]) -> str:
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
                       f"<td>{s['n_judged']}/{s['n']}</td></tr></table>" + _breakdown_html(j) + _calibration_html(j))
        else:
            rows = "".join(f"<tr><td class=name>{e(m)}</td><td>{_f(v['mean_rating'], 2)} <span class=ci>"
                           f"[{_f(v['mean_rating_ci'][0], 2)}, {_f(v['mean_rating_ci'][1], 2)}]</span></td>"
                           f"<td>{_f(v['length_rating_corr'], 2)}</td><td>{_f(v['error_rate'])}</td></tr>"
                           for m, v in s.items())
            out.append(f"<h3>{j['mode']} grading 1–10 (judge: {e(j['judge'])})</h3><table><tr><th class=name>model"
                       "</th><th>mean rating</th><th>length–rating correlation</th><th>judge errors</th></tr>"
                       f"{rows}</table>" + _breakdown_html(j) + _calibration_html(j))
    return "\n".join(out) or "<p>No judge results given.</p>"


def breakdown(j: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """MT-bench's per-turn and per-category view of one judge result: (header, rows).

    Single grading: a row per model, mean 1-10 grade per turn (turn 0 = the whole dialogue) and per
    category. Pairwise: one row, the first model's win rate (ties half) per category. Empty when the
    prompt set had no categories and one turn."""
    s = j["summary"]
    if j["mode"] == "pairwise":
        per = s.get("per_category") or {}
        if len(per) < 2:
            return [], []
        cats = sorted(per)
        return (["models", *cats], [[" vs ".join(j["models"]), *[f"{_f(per[c]['mean'], 2)} (n={per[c]['n']})" for c in cats]]])
    turns = sorted({t for v in s.values() for t in (v.get("per_turn") or {})}, key=int)
    cats = sorted({c for v in s.values() for c in (v.get("per_category") or {}) if c})
    if len(turns) < 2 and not cats:
        return [], []
    head = ["model", *[f"turn {t}" for t in turns if t != "0"], *cats]
    rows = [[m, *[_f((v.get("per_turn") or {}).get(t, {}).get("mean"), 2) for t in turns if t != "0"],
             *[_f((v.get("per_category") or {}).get(c, {}).get("mean"), 2) for c in cats]] for m, v in s.items()]
    return head, rows


def _breakdown_html(j: dict[str, Any]) -> str:
    head, rows = breakdown(j)
    if not rows:
        return ""
    what = "win rate per category" if j["mode"] == "pairwise" else "mean grade per turn and per category"
    return (f"<p>{what}:</p><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


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


def human_section(human: dict[str, Any] | None) -> str:
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


def _answer_cell(rec: dict[str, Any]) -> str:
    """A record's answers, turn by turn; an answer cut at the token budget is marked so it is not read as whole."""
    reasons = rec.get("finish_reasons") or []
    parts = [html.escape(a) + (" <span class=cut>[cut at max_new_tokens]</span>"
                               if k < len(reasons) and reasons[k] == "length" else "")
             for k, a in enumerate(rec["answers"])]
    return "\n---\n".join(parts)


def samples(data: dict[str, Any], models: list[str], n: int) -> str:
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


def markdown(title: str, t: dict[str, Any], judges: list[dict]) -> str:
    with_rm = any(r.get("rm") for r in t["rows"])
    cols = ["model", "role", "judge win rate vs teacher", "teacher NLL", "mean length", "stop rate (n)",
            *[label for _, label in STYLE_COLUMNS], "format adherence",
            *(["RM score [95% CI]"] if with_rm else []), *t["tasks"], "substance [95% CI]", "imitation gap"]
    lines = [f"# {title}", ""]
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
        else:
            lines += ["", f"Judge {j['judge']} ({j['mode']} grading 1-10): " + "; ".join(
                f"{m} {_f(v['mean_rating'], 2)} [{_f(v['mean_rating_ci'][0], 2)}, {_f(v['mean_rating_ci'][1], 2)}]"
                for m, v in s.items())]
        head, rows = breakdown(j)
        if rows:
            lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *["| " + " | ".join(r) + " |" for r in rows]]
    return "\n".join(lines) + "\n"


def human_markdown(h: dict[str, Any] | None) -> str:
    """The people section of report.md: ratings from blind A/B votes, and judge-vs-people agreement."""
    if not h:
        return ""
    text = "\n## People (blind A/B votes)\n\n| model | rating | 95% interval | battles | win rate |\n|---|---|---|---|---|\n"
    text += "".join(f"| {r['model']} | {r['rating']:.0f} | [{r['ci_low']:.0f}, {r['ci_high']:.0f}] | {r['battles']} | "
                    f"{_f(r['win_rate'])} |\n" for r in h["leaderboard"])
    a = h.get("agreement")
    if a:
        text += (f"\nJudge vs people: {a['pairs']} shared cells, agreement without ties {_f(a['agreement_without_ties'])} "
                 f"(n={a['decisive_pairs']}), Cohen's kappa {_f(a['cohen_kappa'])}.\n")
    return text
