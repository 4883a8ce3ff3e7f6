"""Benchmarks: lm-eval metrics, answer extraction, SQL scoring, log-likelihood parity, task loading, bench run."""

from __future__ import annotations

import json
import random

import pytest

from protege.errors import RecordError, StageError
from protege.engine.loglik import encode_question, loglikelihood_reference, score_questions
from protege.evaluate.metrics import (exact_match, extract_answer, extract_sql, mc_metrics, normalize_answer,
                                      open_sqlite, parse_label, run_sql, sql_match)
from protege.tasks.spec import builtin_tasks, load_items, resolve_task, split_fewshot

# ---- multiple-choice metrics on hand-computed log-likelihoods ----------------------------------


def test_acc_and_acc_norm_hand_computed():
    # raw argmax: option 2 (-4.5); per character: -5/1, -6/6=-1, -4.5/2=-2.25 -> option 1
    m = mc_metrics([-5.0, -6.0, -4.5], ["a", "bbbbbb", "cc"], gold=1)
    assert (m["pred"], m["pred_norm"]) == (2, 1)
    assert (m["acc"], m["acc_norm"]) == (0.0, 1.0)
    m = mc_metrics([-5.0, -6.0, -4.5], ["a", "bbbbbb", "cc"], gold=2)
    assert (m["acc"], m["acc_norm"]) == (1.0, 0.0)


def test_acc_norm_counts_characters_acc_bytes_counts_bytes():
    # "éé": 2 characters but 4 UTF-8 bytes. chars: -4/2=-2 vs -5/3=-1.67 -> 1; bytes: -4/4=-1 vs -1.67 -> 0
    m = mc_metrics([-4.0, -5.0], ["éé", "abc"], gold=0)
    assert m["acc_norm"] == 0.0 and m["acc_bytes"] == 1.0


def test_mc_ties_go_to_first_option_and_bad_input():
    assert mc_metrics([-1.0, -1.0], ["x", "y"], gold=0)["acc"] == 1.0
    with pytest.raises(ValueError):
        mc_metrics([-1.0], ["x", "y"], gold=0)
    with pytest.raises(ValueError):
        mc_metrics([-1.0, -2.0], ["x", "y"], gold=5)


# ---- generative answers -----------------------------------------------------------------------


def test_extract_answer_patterns_and_fallback():
    pats = [r"answer is:?\s*\$?(-?\d+(?:,\d{3})*(?:\.\d+)?)", r"(-?\d+(?:,\d{3})*(?:\.\d+)?)"]
    assert extract_answer("3 + 4 = 7, so the answer is 7.", pats) == "7"
    assert extract_answer("First 12, then 30 apples", pats, which="last") == "30"
    assert extract_answer("First 12, then 30 apples", pats, which="first") == "12"
    assert extract_answer("no digits here", pats) is None
    assert extract_answer("\n  Paris\nmore text") == "Paris"
    assert extract_answer("") is None


def test_normalize_and_exact_match():
    assert normalize_answer(" 1,200.0 ") == "1200"
    assert normalize_answer("(B)") == "b"
    assert normalize_answer('"True".') == "true"
    assert exact_match("1,200", "1200") and exact_match("(A)", ["(A)", "A"])
    assert not exact_match(None, "1") and not exact_match("12", "1")


def test_parse_label_format_adherence():
    labels = ["yes", "no"]
    assert parse_label(" Yes.", labels) == "yes"
    assert parse_label("no, it is a news headline", labels) == "no"
    assert parse_label("I think yes", labels) is None  # does not follow the format
    assert parse_label("nope", labels) is None  # a label prefix is not a label
    assert parse_label("", labels) is None
    assert parse_label("not sure", ["not", "not sure"]) == "not sure"


# ---- SQL --------------------------------------------------------------------------------------

DB = """CREATE TABLE t (id INTEGER, name TEXT, score REAL);
INSERT INTO t VALUES (1, 'a', 1.5), (2, 'b', 3.0), (3, 'c', 3.0);"""


def test_sql_correct_wrong_invalid():
    con = open_sqlite(DB)
    gold = "SELECT name FROM t WHERE score = 3"
    assert sql_match(con, "SELECT name FROM t WHERE score > 2", gold)["correct"]  # different query, same rows
    assert sql_match(con, "select NAME from t where score >= 3.0 order by id desc", gold)["correct"]  # order-free
    wrong = sql_match(con, "SELECT name FROM t", gold)
    assert wrong["valid"] and not wrong["correct"]
    invalid = sql_match(con, "SELEC name FROM t", gold)
    assert not invalid["valid"] and not invalid["correct"] and "syntax" in invalid["error"]
    assert not sql_match(con, "SELECT nope FROM t", gold)["valid"]
    assert not sql_match(con, "", gold)["valid"]


def test_sql_order_matters_only_with_order_by_and_db_is_read_only():
    con = open_sqlite(DB)
    gold = "SELECT id FROM t ORDER BY id DESC"
    assert sql_match(con, "SELECT id FROM t ORDER BY id DESC", gold)["correct"]
    assert not sql_match(con, "SELECT id FROM t ORDER BY id", gold)["correct"]
    assert not sql_match(con, "DROP TABLE t", gold)["valid"]
    assert run_sql(con, "SELECT COUNT(*) FROM t").rows == [(3,)]  # the table survived
    with pytest.raises(ValueError):
        sql_match(con, "SELECT 1", "SELECT broken FROM nowhere")


def test_sql_runaway_query_times_out():
    con = open_sqlite(DB)
    res = run_sql(con, "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c",
                  timeout_s=0.2)
    assert res.rows is None and res.error


def test_extract_sql():
    assert extract_sql("SELECT a FROM b; -- done") == "SELECT a FROM b"
    assert extract_sql("Sure:\n```sql\nSELECT 1\n```\nThis works.") == "SELECT 1"
    assert extract_sql("SELECT a\nFROM b\n\nThis query lists a.") == "SELECT a\nFROM b"


# ---- log-likelihood: shared-context scoring == full forward ------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_shared_context_loglik_matches_full_forward(fixture, request):
    model, tok = request.getfixturevalue(fixture)
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog sea capital paris two plus five".split()
    qs = []
    for _ in range(5):  # contexts of very different lengths (left padding) and longer than gemma's window (16)
        ctx = " ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) + " Answer:"
        conts = [" " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(2, 5))]
        qs.append(encode_question(tok, ctx, conts))
    # a small logits budget forces several option chunks over the same context cache
    scores = score_questions(model, qs, pad_id=tok.pad_token_id, logits_budget=3000)
    for q, row in zip(qs, scores):
        for cont, (ll, _) in zip(q.continuation_ids, row):
            assert ll == pytest.approx(loglikelihood_reference(model, q.context_ids, cont), abs=1e-4)


def test_encode_question_follows_lm_eval_split(tiny_llama):
    _, tok = tiny_llama
    q = encode_question(tok, "Question: two plus three?\nAnswer: ", ["five", "two"])
    # the trailing space moved to the continuation; context ids are tok(context without it)
    assert q.context_ids == tok.encode("Question: two plus three?\nAnswer:")
    whole = tok.encode("Question: two plus three?\nAnswer: five")
    assert q.context_ids + q.continuation_ids[0] == whole
    empty = encode_question(tok, "", ["five"])
    assert empty.context_ids == [tok.bos_token_id]


# ---- tasks ------------------------------------------------------------------------------------


def test_builtin_tasks_load_and_are_valid():
    assert set(builtin_tasks()) >= {"world_knowledge", "arithmetic", "clickbait", "sql_shop"}
    for name in builtin_tasks():
        spec = resolve_task(name)
        items = load_items(spec)
        assert 30 <= len(items) <= 120, name
        assert len({it["id"] for it in items}) == len(items)
    sql = resolve_task("sql_shop")
    con = open_sqlite(sql.path(sql.database).read_text())
    for it in load_items(sql):  # every gold query runs and returns rows
        assert run_sql(con, it["sql"]).rows, it["id"]


def test_agieval_and_bbh_loaders(tmp_path):
    ag = tmp_path / "mini-agieval.jsonl"
    ag.write_text(json.dumps({"passage": None, "question": "Two plus two?", "options": ["(A)3", "(B)4", "(C)5"],
                              "label": "B", "answer": None}) + "\n")
    spec = resolve_task(f"agieval:{ag}")
    (item,) = load_items(spec)
    assert item["choices"] == ["3", "4", "5"] and item["gold"] == 1 and spec.type == "multiple_choice"
    bbh = tmp_path / "mini_bbh.json"
    bbh.write_text(json.dumps({"examples": [{"input": "not True is", "target": "False"}]}))
    spec = resolve_task(f"bbh:{bbh}")
    (item,) = load_items(spec)
    assert (item["question"], item["answer"], spec.type) == ("not True is", "False", "generate")


def test_real_shared_data_loads(shared_data):
    spec = resolve_task(f"agieval:{shared_data / 'agieval' / 'sat-math.jsonl'}")
    items = load_items(spec)
    assert len(items) > 100 and all(0 <= it["gold"] < len(it["choices"]) for it in items)
    assert load_items(resolve_task(f"bbh:{shared_data / 'bbh' / 'boolean_expressions.json'}"))


def test_bad_task_inputs_name_the_problem(tmp_path):
    with pytest.raises(StageError, match="not a built-in task"):
        resolve_task("no_such_task")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "gold": 0}\n{not json\n')
    yaml = tmp_path / "t.yaml"
    yaml.write_text(f"name: t\ntype: multiple_choice\ndata: {bad.name}\n")
    with pytest.raises(RecordError, match=r"bad.jsonl:2: bad JSON"):
        load_items(resolve_task(str(yaml)))
    bad.write_text('{"question": "q", "choices": ["a", "b"], "gold": 7}\n')
    with pytest.raises(StageError, match="gold"):
        load_items(resolve_task(str(yaml)))
    ag = tmp_path / "ag.jsonl"
    ag.write_text(json.dumps({"question": "q", "options": ["(A)x", "(B)y"], "label": "Z"}) + "\n")
    with pytest.raises(StageError, match="label"):
        load_items(resolve_task(f"agieval:{ag}"))
    from protege.config import ConfigError

    yaml.write_text("name: t\ntype: multiple_choice\ndata: x.jsonl\ntemplat: oops\n")
    with pytest.raises(ConfigError, match="did you mean `template`"):
        resolve_task(str(yaml))


def test_fewshot_split_and_plain_prompt():
    from protege.evaluate.prompts import PromptBuilder

    spec = resolve_task("clickbait")
    shots, items = split_fewshot(spec, load_items(spec), 2)
    assert len(items) == 58 and shots[0]["id"] not in {it["id"] for it in items}
    text = PromptBuilder(spec, shots).context(items[0])
    expected = (f"{spec.instruction}\n\nHeadline: {shots[0]['text']}\nClickbait: {shots[0]['label']}\n\n"
                f"Headline: {shots[1]['text']}\nClickbait: {shots[1]['label']}\n\nHeadline: {items[0]['text']}\nClickbait:")
    assert text == expected


# ---- the stage end to end on a tiny model -----------------------------------------------------


def _tiny_tasks(tmp_path):
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps({"question": f"q{i}", "choices": ["two", "five", "sea"],
                                                           "gold": i % 3}) + "\n" for i in range(6)))
    (tmp_path / "mc.yaml").write_text("name: mc\ntype: multiple_choice\ndata: mc.jsonl\n")
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps({"question": f"{i} plus 1?", "answer": str(i + 1)}) + "\n"
                                                for i in range(4)))
    (tmp_path / "gen.yaml").write_text("name: gen\ntype: generate\ndata: gen.jsonl\nmax_new_tokens: 4\nfewshot: 1\n")
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps({"text": f"h{i}", "label": ["yes", "no"][i % 2]}) + "\n"
                                                for i in range(4)))
    (tmp_path / "cls.yaml").write_text("name: cls\ntype: classify\ndata: cls.jsonl\nlabels: [\"yes\", \"no\"]\nmax_new_tokens: 3\n")
    return [str(tmp_path / f"{n}.yaml") for n in ("mc", "gen", "cls")] + ["sql_shop"]


def test_bench_run_writes_results_and_resumes(tmp_path, tiny_llama_dir):
    from protege.evaluate.bench import BenchConfig, run

    out = tmp_path / "out"
    cfg = BenchConfig(model=str(tiny_llama_dir), tasks=_tiny_tasks(tmp_path), out_dir=str(out), limit=3,
                      batch_size=2, prompt_style="plain")
    summary = run(cfg)
    assert set(summary) == {"mc", "gen", "cls", "sql_shop"}
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"]["cls"]["format_adherence"] >= 0 and results["tasks"]["mc"]["n"] == 3
    assert 0 <= results["tasks"]["sql_shop"]["valid_sql"] <= 1
    rec = json.loads((out / "items" / "mc.jsonl").read_text().splitlines()[0])
    assert len(rec["logliks"]) == 3 and rec["acc"] in (0.0, 1.0)
    assert (out / "manifest.json").exists() and (out / "config.yaml").exists()
    # rerun: nothing is scored twice; a larger limit scores only the new items
    run(cfg)
    assert len((out / "items" / "mc.jsonl").read_text().splitlines()) == 3
    run(cfg.model_copy(update={"limit": 5}))
    assert len((out / "items" / "mc.jsonl").read_text().splitlines()) == 5
    # a changed setup (few-shot) starts the task afresh instead of mixing results
    run(cfg.model_copy(update={"fewshot": 1, "tasks": cfg.tasks[:1]}))
    assert len((out / "items" / "mc.jsonl").read_text().splitlines()) == 3


def test_bench_chat_prompting_runs(tmp_path, tiny_llama_dir):
    from protege.evaluate.bench import BenchConfig, run

    cfg = BenchConfig(model=str(tiny_llama_dir), tasks=_tiny_tasks(tmp_path)[:2], out_dir=str(tmp_path / "o"),
                      limit=2, prompt_style="chat")
    run(cfg)
    rec = json.loads((tmp_path / "o" / "items" / "mc.jsonl").read_text().splitlines()[0])
    assert "<|im_start|>" in rec["prompt"]


def test_datasets_loadable_source_with_field_mapping(tmp_path):
    (tmp_path / "heads.csv").write_text("headline,is_clickbait\nYou will not believe this,yes\nRates unchanged,no\n")
    (tmp_path / "t.yaml").write_text('name: csvtask\ntype: classify\ndata: heads.csv\nlabels: ["yes", "no"]\n'
                                     "fields: {text: headline, label: is_clickbait}\n")
    items = load_items(resolve_task(str(tmp_path / "t.yaml")))
    assert [(it["text"], it["label"]) for it in items] == [("You will not believe this", "yes"), ("Rates unchanged", "no")]
    (tmp_path / "t.yaml").write_text('name: csvtask\ntype: classify\ndata: heads.csv\nfields: {text: title}\n')
    with pytest.raises(StageError, match="`title`"):
        load_items(resolve_task(str(tmp_path / "t.yaml")))


@pytest.mark.slow
def test_builtin_model_mc_scores_match_full_forward():
    from conftest import builtin_model

    from protege.evaluate.prompts import PromptBuilder
    from protege.models import load

    model, tok = load(builtin_model("smollm2-135m-instruct"), device="cpu")
    spec = resolve_task("world_knowledge")
    shots, items = split_fewshot(spec, load_items(spec), 2)
    builder = PromptBuilder(spec, shots)
    qs = [encode_question(tok, builder.context(it), builder.options(it)[0]) for it in items[:4]]
    for q, row in zip(qs, score_questions(model, qs, pad_id=tok.pad_token_id or 0)):
        for cont, (ll, _) in zip(q.continuation_ids, row):
            assert ll == pytest.approx(loglikelihood_reference(model, q.context_ids, cont), abs=1e-3)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_shared_fewshot_prefix_matches_full_forward(fixture, request):
    model, tok = request.getfixturevalue(fixture)
    shots = "Question: two plus three?\nAnswer: five\n\nQuestion: the capital of France?\nAnswer: Paris\n\n"
    qs = [encode_question(tok, shots + f"Question: {q}\nAnswer:", [" five", " the sea", " Paris"])
          for q in ("two plus two?", "what is blue and wide?", "quick brown fox jumps over the lazy dog?")]
    for q, row in zip(qs, score_questions(model, qs, pad_id=tok.pad_token_id)):
        for cont, (ll, _) in zip(q.continuation_ids, row):
            assert ll == pytest.approx(loglikelihood_reference(model, q.context_ids, cont), abs=1e-4)


def test_passage_groups_share_their_prefix_and_match_full_forward(tiny_llama, monkeypatch):
    """Reading-comprehension layout: several questions per passage, in shuffled order, plus loners.
    `iter_sorted` must batch each passage's questions together (so its prefix runs once) and still
    return every question's exact log-likelihoods under its own index."""
    from protege.engine import loglik

    model, tok = tiny_llama
    passages = [" ".join(f"passage {p} sentence {k} about the river and the town." for k in range(6)) for p in range(3)]
    texts = [f"{passages[p]}\nQuestion: what happened in part {q}?\nAnswer:" for p in range(3) for q in range(3)]
    texts += ["a lone question with no passage?", "another unrelated context, a little longer than that one?"]
    random.Random(0).shuffle(texts)
    qs = [encode_question(tok, t, [" the river", " the town", " nothing at all"]) for t in texts]
    groups = loglik._prefix_groups(qs, 32)
    assert sorted(len(g) for g in groups) == [1, 1, 3, 3, 3]
    batches = []
    real = loglik.score_questions
    monkeypatch.setattr(loglik, "score_questions", lambda m, b, **kw: batches.append(len(b)) or real(m, b, **kw))
    rows = dict(loglik.iter_sorted(model, qs, batch_size=8))
    assert sorted(batches) == [2, 3, 3, 3]  # one batch per passage, the two loners together
    assert sorted(rows) == list(range(len(qs)))
    for i, q in enumerate(qs):
        for cont, (ll, _) in zip(q.continuation_ids, rows[i]):
            assert ll == pytest.approx(loglikelihood_reference(model, q.context_ids, cont), abs=1e-4)
