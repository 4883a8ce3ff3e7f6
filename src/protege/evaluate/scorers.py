"""One scorer per task type: a batch of items in, one result record per item out.

Multiple choice runs the model's forward directly (`loglik.score_questions`); the generative types
(generate, classify, sql) decode greedily with the engine and score the text (`metrics`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import StageError
from ..engine.loglik import encode_question, score_sorted
from .prompts import PromptBuilder, gold_text
from .metrics import exact_match, extract_answer, extract_sql, mc_metrics, open_sqlite, parse_label, sql_match
from ..tasks.spec import TaskSpec

__all__ = ["make_scorer", "sqlite_schema"]

Scorer = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]


def sqlite_schema(con: Any) -> str:
    """The CREATE TABLE statements of a database, as shown to the model."""
    rows = con.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND sql IS NOT NULL ORDER BY rowid")
    return "\n".join(r[0].strip() + ";" for r in rows)


def make_scorer(runner: Any, spec: TaskSpec, shots: list[dict[str, Any]]) -> Scorer:
    """The scoring function for `spec` on the runner's model (see module docstring)."""
    extra: dict[str, Any] = {}
    con = None
    if spec.type == "sql":
        if not spec.database:
            raise StageError(f"task {spec.name}: an sql task needs `database:` (an SQL script of schema + rows)")
        db_path = spec.path(spec.database)
        if not db_path.exists():
            raise StageError(f"task {spec.name}: database script {db_path} not found")
        con = open_sqlite(Path(db_path).read_text(encoding="utf-8"))
        extra["schema"] = sqlite_schema(con)
    prompts = PromptBuilder(spec, shots, runner.chat, extra)
    if spec.type == "multiple_choice":
        return lambda batch: _score_mc(runner, prompts, batch)
    return lambda batch: _score_generated(runner, prompts, batch, con)


def _score_mc(runner: Any, prompts: PromptBuilder, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    tok = runner.tok
    encoded, meta = [], []
    for item in batch:
        context = prompts.context(item)
        conts, texts = prompts.options(item)
        encoded.append(encode_question(tok, context, conts))
        meta.append((context, texts))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    scores = score_sorted(runner.model, encoded, batch_size=max(runner.cfg.batch_size, 1), pad_id=pad,
                          max_length=runner.cfg.max_length)
    records = []
    for item, (context, texts), opt_scores in zip(batch, meta, scores):
        lls = [s for s, _ in opt_scores]
        m = mc_metrics(lls, texts, item["gold"])
        records.append({"id": item["id"], "prompt": context, "choices": texts, "gold": item["gold"],
                        "logliks": lls, "is_greedy": [g for _, g in opt_scores], **m,
                        "correct": bool(m["acc"])})
    return records


def _score_generated(runner: Any, prompts: PromptBuilder, batch: list[dict[str, Any]],
                     con: Any) -> list[dict[str, Any]]:
    from ..engine import SamplingParams

    spec = prompts.spec
    params = SamplingParams(max_new_tokens=spec.max_new_tokens, temperature=0.0, stop=prompts.stop)
    ids = [prompts.generation_ids(item, runner.tok) for item in batch]
    # Keep room for the answer: a prompt longer than the model's window loses its oldest tokens (the
    # first shots), as lm-eval does; `truncated` in the record says so.
    window = getattr(runner.model.config, "max_position_embeddings", None) or 1 << 30
    keep = max(1, window - spec.max_new_tokens - 1)
    truncated = [len(x) > keep for x in ids]
    ids = [x[-keep:] for x in ids]
    outs = runner.engine.generate(ids, params)
    records = []
    for item, prompt_ids, cut, out in zip(batch, ids, truncated, outs):
        text = out.text
        rec: dict[str, Any] = {"id": item["id"], "prompt": runner.tok.decode(prompt_ids),
                               "output": text, "finish_reason": out.finish_reason, "truncated": cut}
        if spec.type == "generate":
            pred = extract_answer(text, spec.answer_regex, spec.answer_match)
            if pred is None and spec.fallback_first_line:
                pred = extract_answer(text)
            rec.update(gold=item["answer"], extracted=pred, correct=exact_match(pred, item["answer"]))
        elif spec.type == "classify":
            label = parse_label(text, spec.labels)
            rec.update(gold=item["label"], extracted=label, valid=label is not None,
                       correct=label is not None and label.lower() == str(item["label"]).lower())
        else:
            sql = extract_sql(text)
            try:
                res = sql_match(con, sql, gold_text(spec, item).rstrip(";"))
            except ValueError as err:
                raise StageError(f"task {spec.name}, item {item['id']}: {err}") from None
            rec.update(gold=item["sql"], extracted=sql, valid=res["valid"], correct=res["correct"],
                       error=res["error"])
        records.append(rec)
    return records
