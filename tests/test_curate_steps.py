"""Unit tests of each curation step: clean, split, MinHash/LSH, dedup, language, quality, decontaminate, mix, tag, resume."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from protege.curate import (CleanStep, CurateConfig, DecontaminateStep, DedupStep, LanguageStep, MixStep, QualityStep,
                            SplitStep, TagStep, run)
from protege.curate import clean, decontam, dedup, langid, mix, quality, split, tag
from protege.curate.minhash import (candidate_pairs, estimated_jaccard, minhash_signatures, near_duplicate_clusters,
                                    optimal_bands, shingle_hashes)
from protege.errors import RecordError, StageError
from protege.records import Comparison, Conversation

WORDS = ("apple river stone cloud paper window garden music light table summer winter road bridge forest "
         "letter basket silver yellow quiet rapid gentle ancient narrow bright hollow distant candle "
         "harbor meadow pencil thunder velvet whisper lantern orchard pepper saddle timber canyon").split()


def conv(user: str, answer: str, rid: str = "", source: str = "s") -> Conversation:
    return Conversation([{"role": "user", "content": user}, {"role": "assistant", "content": answer}], id=rid, source=source)


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


# ---- clean --------------------------------------------------------------------------------------

def test_clean_html_boilerplate_and_teacher_phrases():
    recs = [conv("<p>How do I <strong>boil</strong> an egg?</p>", "1 / 1\nPut it in water.\nCopy code", "a"),
            conv("Tell me about yourself", "I was trained by OpenAI to help.", "b"),
            conv("What is openaiish?", "A made-up word unrelated to anything.", "c"),
            conv("Who makes ChatGPT?", "A company does.", "d")]
    res = clean.apply(recs, CleanStep())
    assert [r.id for r in res.kept] == ["a", "c", "d"]  # scope=assistant: the user may name the product
    assert res.kept[0].messages == [{"role": "user", "content": "How do I **boil** an egg?"},
                                    {"role": "assistant", "content": "Put it in water."}]
    assert res.removed[0]["reason"] == "teacher_reference" and "OpenAI" in res.removed[0]["detail"]
    res = clean.apply([conv("Who makes ChatGPT?", "A company does.", "d")], CleanStep(teacher_scope="all"))
    assert not res.kept and res.removed[0]["reason"] == "teacher_reference"


def test_repair_roles_merges_drops_and_truncates():
    msgs = [{"role": "gpt", "content": "Hi!"}, {"role": "human", "content": "one"}, {"role": "user", "content": "two"},
            {"role": "system", "content": "late system"}, {"role": "assistant", "content": "answer"},
            {"role": "robot", "content": "??"}, {"role": "user", "content": "dangling"}]
    rec = Conversation(msgs, id="x")
    res = clean.apply([rec], CleanStep())
    assert res.kept[0].messages == [{"role": "user", "content": "one\n\ntwo"}, {"role": "assistant", "content": "answer"}]
    res = clean.apply([Conversation(list(msgs), id="x")], CleanStep(roles="drop"))
    assert res.removed[0]["reason"] == "broken_roles"


def test_clean_removes_conversations_with_nothing_to_train():
    recs = [Conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}], id="e"),
            Conversation([{"role": "assistant", "content": "only me"}], id="f"),
            Conversation([{"role": "user", "content": "only me"}], id="g")]
    res = clean.apply(recs, CleanStep())
    assert not res.kept and {e["reason"] for e in res.removed} == {"empty"}


def test_clean_keeps_code_with_angle_brackets():
    code = "Use `List<int>` and `a < b > c` here."
    res = clean.apply([conv("Generics?", code)], CleanStep())
    assert res.kept[0].messages[1]["content"] == code


# ---- split --------------------------------------------------------------------------------------

def test_split_at_turn_boundaries_within_budget():
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    rng = random.Random(0)
    msgs = [{"role": "system", "content": "Be brief."}]
    for _ in range(6):
        msgs += [{"role": "user", "content": text(rng, 20)}, {"role": "assistant", "content": text(rng, 40)}]
    rec = Conversation(msgs, id="long")

    class Ctx:
        seed = 0

        def tokenizer(self, spec):
            return tok

    count = lambda b: [len(x) for x in tok(b, add_special_tokens=False)["input_ids"]]  # noqa: E731
    total = sum(count([m["content"] for m in msgs])) + 6 * len(msgs)
    budget = total // 3
    res = split.apply([rec], SplitStep(max_tokens=budget), Ctx())
    assert len(res.kept) >= 3 and res.added == len(res.kept) - 1
    rebuilt = [m for piece in res.kept for m in piece.messages if m["role"] != "system"]
    assert rebuilt == msgs[1:]
    for k, piece in enumerate(res.kept):
        assert piece.id == f"long-part{k}" and piece.meta["split_from"] == "long"
        assert piece.messages[0]["role"] == "system" and piece.messages[1]["role"] == "user"
        assert piece.messages[-1]["role"] == "assistant"
        assert sum(count([m["content"] for m in piece.messages])) + 6 * len(piece.messages) <= budget
    res = split.apply([Conversation(msgs, id="long")], SplitStep(max_tokens=10, drop_oversized=True), Ctx())
    assert not res.kept and res.removed[0]["reason"] == "too_long"
    res = split.apply([Conversation(msgs, id="long")], SplitStep(max_tokens=10), Ctx())
    assert len(res.kept) == 6  # one pair per piece, kept although over budget


# ---- MinHash / LSH ------------------------------------------------------------------------------

def test_estimated_jaccard_tracks_true_jaccard():
    rng = random.Random(1)
    pairs, truths, texts = [], [], []
    for k in range(60):
        a = [f"w{rng.randrange(100000)}" for _ in range(200)]
        keep = rng.random()
        b = [w if rng.random() < keep else f"x{rng.randrange(100000)}" for w in a]
        texts += [" ".join(a), " ".join(b)]
        sa, sb = set(a), set(b)
        truths.append(len(sa & sb) / len(sa | sb))
        pairs.append((2 * k, 2 * k + 1))
    h, off = shingle_hashes(texts, ngram=1)
    sig = minhash_signatures(h, off, num_perm=256)
    est = estimated_jaccard(np.ascontiguousarray(sig.T), np.array(pairs))
    err = np.abs(est - np.array(truths))
    assert err.mean() < 0.03 and err.max() < 0.12


def test_shingles_short_and_empty_texts():
    h, off = shingle_hashes(["one two three four", "tiny", "", "one two three four"], ngram=3)
    counts = np.diff(off)
    assert counts.tolist() == [2, 1, 0, 2]
    assert h[off[0]:off[1]].tolist() == h[off[3]:off[4]].tolist()
    nd = near_duplicate_clusters(["", "", "tiny", "tiny", "unrelated words here"], ngram=3, threshold=0.5)
    assert nd.root.tolist() == [0, 1, 2, 2, 4]  # empty texts are never duplicates of each other


def test_lsh_finds_planted_pairs_and_bands_favor_recall():
    b, r = optimal_bands(0.5, 128)
    assert b * r <= 128 and 1 - (1 - 0.55 ** r) ** b > 0.9
    rng = random.Random(2)
    texts = [" ".join(f"t{rng.randrange(50000)}" for _ in range(150)) for _ in range(200)]
    texts.append(texts[7].replace(texts[7].split()[3], "changed", 1))
    h, off = shingle_hashes(texts, 3)
    sig = minhash_signatures(h, off, 128)
    pairs = candidate_pairs(sig, b, r)
    assert [7, 200] in pairs.tolist()
    nd = near_duplicate_clusters(texts, 3, 0.5)
    assert nd.clusters() == [[7, 200]] and nd.similarity[200] > 0.8


# ---- dedup step ---------------------------------------------------------------------------------

def test_dedup_exact_first_user_and_conversation_modes():
    recs = [conv("Hello,  World!", "a", "1"), conv("hello world", "b", "2"), conv("Other", "a", "3")]
    res = dedup.apply(list(recs), DedupStep(near=False))
    assert [r.id for r in res.kept] == ["1", "3"] and res.removed[0]["detail"].endswith("as 1")
    res = dedup.apply(list(recs), DedupStep(near=False, exact="conversation"))
    assert [r.id for r in res.kept] == ["1", "2", "3"]
    top = dedup.apply(list(recs), DedupStep(near=False)).stats["top_clusters"]
    assert top[0]["size"] == 2 and top[0]["kept"] == "1"


# ---- language -----------------------------------------------------------------------------------

def test_language_detector_matches_langid_and_filters():
    from langid.langid import LanguageIdentifier, model

    ref = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    samples = ["Das Wetter ist heute schön und wir gehen im Garten spazieren",
               "Nous allons au marché ce matin pour acheter du pain et des fruits",
               "We are going to the market this morning to buy bread and fruit"]
    det = langid.detector()
    for s in samples:
        lang, prob = det.detect(s)
        assert (lang, round(prob, 4)) == (ref.classify(s)[0], round(ref.classify(s)[1], 4))
    recs = [conv(s, s, str(i)) for i, s in enumerate(samples)] + [conv("ok", "fine", "short")]
    res = langid.apply(recs, LanguageStep(keep=["en"]))
    assert [r.id for r in res.kept] == ["2", "short"] and res.kept[1].meta["language"] == "und"
    res = langid.apply([conv(s, s, str(i)) for i, s in enumerate(samples)], LanguageStep(keep=[], drop=["de"]))
    assert [r.id for r in res.kept] == ["1", "2"] and res.stats["languages"] == {"de": 1, "fr": 1, "en": 1}


# ---- quality ------------------------------------------------------------------------------------

def test_quality_rules_and_top_k():
    loop = "I like it. " * 30
    recs = [conv("q1", "A fine and varied answer about rivers and stones.", "ok"),
            conv("q2", loop, "loop"), conv("q3", "I'm sorry, but I cannot help with that request.", "refuse"),
            conv("q4", "x " * 500, "long")]
    res = quality.apply(recs, QualityStep(max_response_words=200))
    assert [r.id for r in res.kept] == ["ok"]
    assert {e["id"]: e["reason"] for e in res.removed} == {"loop": "repetition", "refuse": "refusal", "long": "too_long"}
    assert quality.repetition("a b c a b c a b c", 3) > 0.5 and quality.repetition("a b c d e", 3) == 0.0
    scored = [conv(f"q{i}", f"answer number {i} here", f"s{i}") for i in range(5)]
    for i, r in enumerate(scored):
        if i != 4:
            r.meta["score"] = float(i % 3)
    res = quality.apply(scored, QualityStep(top_k_by="score", top_k=2))
    assert [r.id for r in res.kept] == ["s1", "s2"]  # scores 1, 2 (order kept); unscored s4 ranks last
    assert all(e["reason"] == "below_top_k" for e in res.removed)


def test_quality_drops_answers_cut_at_the_token_limit():
    cut, whole, multi = (conv("q", "An answer that ran out of", "cut"), conv("q2", "A whole answer.", "whole"),
                         conv("q3", "Another whole answer.", "multi"))
    cut.meta["finish_reason"] = "length"          # self-instruct's meta
    whole.meta["finish_reason"] = "stop"
    multi.meta["finish_reasons"] = ["stop", "length"]  # distill's meta, one per answered turn
    res = quality.apply([cut, whole, multi], QualityStep())
    assert [r.id for r in res.kept] == ["whole"]
    assert {e["id"]: e["reason"] for e in res.removed} == {"cut": "truncated", "multi": "truncated"}
    assert len(quality.apply([cut, whole, multi], QualityStep(drop_truncated=False)).kept) == 3


# ---- decontaminate ------------------------------------------------------------------------------

def test_indexed_bleu_equals_brute_force(tmp_path):
    """The trigram candidate index must not miss any pair a full train x eval BLEU scan finds."""
    from sacrebleu.metrics import BLEU

    rng = random.Random(3)
    evals = [text(rng, rng.randint(6, 25)) for _ in range(60)]
    train = []
    for _ in range(150):
        src = rng.choice(evals).split()
        mode = rng.random()
        if mode < 0.4:   # light edits of an eval prompt
            train.append(" ".join(w if rng.random() > 0.3 else rng.choice(WORDS) for w in src))
        elif mode < 0.7:  # shuffled eval words: unigram overlap without order
            rng.shuffle(src)
            train.append(" ".join(src))
        else:
            train.append(text(rng, rng.randint(5, 30)))
    path = tmp_path / "ev.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": e}) + "\n" for i, e in enumerate(evals)))
    bleu = BLEU(effective_order=True)
    brute = {i for i, t in enumerate(train) if max(bleu.sentence_score(t, [e]).score for e in evals) >= 20}
    recs = [conv(t, "answer", f"t{i}") for i, t in enumerate(train)]
    res = decontam.apply(recs, DecontaminateStep(eval_sets=[str(path)], ngram=13, min_words=50))
    indexed = {int(e["id"][1:]) for e in res.removed}
    assert brute and brute <= indexed
    assert all(int(e["id"][1:]) in brute or "exact" in e["detail"] for e in res.removed)


def test_eval_loaders_task_formats_and_errors(tmp_path):
    mt = tmp_path / "mt.jsonl"
    mt.write_text(json.dumps({"question_id": 7, "turns": ["first turn here", "second turn here"]}) + "\n")
    bbh = tmp_path / "task.json"
    bbh.write_text(json.dumps({"examples": [{"input": "is true and false", "target": "False"}]}))
    recs = tmp_path / "recs.jsonl"
    recs.write_text(json.dumps({"messages": [{"role": "user", "content": "hi there"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n")
    fields = DecontaminateStep().fields
    assert [(p.item_id, p.text) for p in decontam.load_eval_prompts(mt, fields)] == [("7#1", "first turn here"),
                                                                                     ("7#2", "second turn here")]
    assert decontam.load_eval_prompts(bbh, fields)[0].text == "is true and false"
    assert decontam.load_eval_prompts(recs, fields)[0].text == "hi there"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"label": "A"}) + "\n")
    with pytest.raises(StageError, match=r"bad.jsonl:2: no eval prompt.*set `fields`"):
        decontam.load_eval_prompts(bad, fields)
    bad.write_text("{not json\n")
    with pytest.raises(RecordError, match=r"bad.jsonl:1: bad JSON"):
        decontam.load_eval_prompts(bad, fields)
    with pytest.raises(FileNotFoundError, match="built-in task: arithmetic"):
        decontam.load_eval_prompts(tmp_path / "none.jsonl", fields)
    # a built-in task by name (issue 26: recipes named the package's files by repository path, which a wheel
    # install does not have), and a task YAML, read the task's items file
    from protege.tasks import BUILTIN_DIR

    by_name = decontam.load_eval_prompts("arithmetic", fields)
    assert by_name and by_name == decontam.load_eval_prompts(BUILTIN_DIR / "arithmetic.jsonl", fields)
    assert decontam.load_eval_prompts(BUILTIN_DIR / "arithmetic.yaml", fields) == by_name
    with pytest.raises(StageError, match="no `eval_sets`"):
        decontam.apply([], DecontaminateStep())


def test_short_eval_prompts_match_whole_or_exact(tmp_path):
    ev = tmp_path / "ev.jsonl"
    ev.write_text(json.dumps({"question": "name three rivers of the ancient world please"}) + "\n"
                  + json.dumps({"question": "Hi there"}) + "\n")
    recs = [conv("Quick task: name three rivers of the ancient world please, thanks", "a", "whole"),
            conv("hi THERE!", "b", "exact"), conv("hi there friend, how are the rivers", "c", "clean")]
    res = decontam.apply(recs, DecontaminateStep(eval_sets=[str(ev)], bleu_threshold=None))
    assert [r.id for r in res.kept] == ["clean"]
    assert res.stats["eval_sets"] == {"ev.jsonl": {"prompts": 2, "prompts_hit": 2}}


def test_decontaminate_against_mt_bench(shared_data, tmp_path):
    """A real eval file: MT-bench questions pasted into training prompts are all found."""
    mt = shared_data / "mt_bench_question.jsonl"
    questions = [json.loads(x) for x in mt.read_text().splitlines()]
    rng = random.Random(4)
    recs = [conv(text(rng, 5) + " " + q["turns"][0], "answer", f"c{q['question_id']}") for q in questions[:20]]
    recs += [conv(text(rng, 30), "answer", f"clean{i}") for i in range(50)]
    res = decontam.apply(recs, DecontaminateStep(eval_sets=[str(mt)]))
    assert {e["id"] for e in res.removed} == {f"c{q['question_id']}" for q in questions[:20]}


# ---- mix / tag ----------------------------------------------------------------------------------

def _sourced(n: int, source: str) -> list[Conversation]:
    return [conv(f"{source} q{i}", "a", f"{source}{i}", source) for i in range(n)]


class _Seed:
    def __init__(self, seed: int):
        self.seed = seed


def test_mix_caps_epochs_weights_deterministic():
    recs = _sourced(10, "a") + _sourced(4, "b") + _sourced(3, "c")
    opts = MixStep(sources={"a": {"cap": 5}, "b": {"epochs": 2.5}}, unlisted="drop")
    r1 = mix.apply(list(recs), opts, _Seed(1))
    r2 = mix.apply(list(recs), opts, _Seed(1))
    assert [r.id for r in r1.kept] == [r.id for r in r2.kept]
    assert r1.stats["mix"] == {"a": {"in": 10, "out": 5}, "b": {"in": 4, "out": 10}, "c": {"in": 3, "out": 0}}
    assert r1.added == 6 and len(r1.removed) == 5 + 3
    assert len(r1.kept) + len(r1.removed) == len(recs) + r1.added
    assert all(r.meta["repeat_of"] for r in r1.kept if "~r" in r.id)
    r3 = mix.apply(list(recs), opts, _Seed(2))
    assert [r.id for r in r3.kept] != [r.id for r in r1.kept]
    w = mix.apply(list(recs), MixStep(total=10, sources={"a": {"weight": 3}, "b": {"weight": 1}}), _Seed(0))
    assert w.stats["mix"]["a"]["out"] == 8 and w.stats["mix"]["b"]["out"] == 2 and w.stats["mix"]["c"]["out"] == 3
    with pytest.raises(StageError, match="needs `total`"):
        mix.apply(list(recs), MixStep(sources={"a": {"weight": 1}}), _Seed(0))


def test_mix_says_when_a_listed_source_matches_no_record(capsys):
    """A cap keyed by a name no record carries (a file's name, a typo) capped nothing, silently."""
    recs = _sourced(4, "seed_tasks")
    r = mix.apply(list(recs), MixStep(sources={"alpaca": {"cap": 1}}), _Seed(0))
    assert len(r.kept) == 4 and r.stats["unmatched_sources"] == ["alpaca"]
    assert "mix.sources ['alpaca'] match no record; sources present: ['seed_tasks']" in capsys.readouterr().err
    assert "unmatched_sources" not in mix.apply(list(recs), MixStep(sources={"seed_tasks": {"cap": 1}}), _Seed(0)).stats


def test_tag_comparisons_with_markers():
    cmp_ = Comparison([{"role": "user", "content": "Tell a joke"}], {"role": "assistant", "content": "Good joke"},
                      {"role": "assistant", "content": "Bad joke"}, id="c1")
    res = tag.apply([cmp_, conv("q", "a", "plain")], TagStep(positive="<good>", negative="<bad>"))
    assert [r.id for r in res.kept] == ["c1:chosen", "c1:rejected", "plain"] and res.added == 1
    assert res.kept[0].messages == [{"role": "system", "content": "<good>"}, {"role": "user", "content": "Tell a joke"},
                                    {"role": "assistant", "content": "Good joke"}]
    assert res.kept[1].messages[0]["content"] == "<bad>" and res.kept[1].meta["tagged_from"] == "c1"
    res = tag.apply([cmp_], TagStep(placement="user_suffix", include_rejected=False))
    assert len(res.kept) == 1 and res.kept[0].messages[0]["content"] == "Tell a joke\n\n<|good|>"


def test_tag_pipeline_records_markers_and_invariant(tmp_path):
    src = tmp_path / "prefs.jsonl"
    rows = [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"question {i} about rivers"}],
             "chosen": {"role": "assistant", "content": "a good answer"},
             "rejected": {"role": "assistant", "content": "a bad answer"}} for i in range(4)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run(CurateConfig(inputs=[str(src)], out_dir=str(tmp_path / "o"),
                               steps=[{"step": "clean"}, {"step": "dedup"}, {"step": "tag"}]))
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["markers"]["positive"] == "<|good|>"
    assert summary["in"] + summary["added"] == summary["out"] + summary["removed"] == 8
    assert "Conditional-training markers" in (tmp_path / "o" / "card.md").read_text()


# ---- resume -------------------------------------------------------------------------------------

def test_killed_run_resumes_from_last_finished_step(tmp_path, monkeypatch):
    from protege.curate import pipeline

    rng = random.Random(5)
    rows = [conv(text(rng, 10), text(rng, 30), f"r{i}").to_dict() for i in range(30)]
    rows += [dict(rows[0], id="dup")]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = [{"step": "clean"}, {"step": "dedup"}, {"step": "quality"}]
    calls = {"clean": 0}
    real_clean, real_quality = pipeline.APPLY["clean"], pipeline.APPLY["quality"]

    def counting_clean(*a, **k):
        calls["clean"] += 1
        return real_clean(*a, **k)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setitem(pipeline.APPLY, "clean", counting_clean)
    monkeypatch.setitem(pipeline.APPLY, "quality", killed)
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        run(CurateConfig(inputs=[str(src)], out_dir=str(out), steps=steps))
    assert (out / ".steps" / "01-dedup" / "state.json").exists() and not (out / "records.jsonl").exists()
    monkeypatch.setitem(pipeline.APPLY, "quality", real_quality)
    summary = run(CurateConfig(inputs=[str(src)], out_dir=str(out), steps=steps))
    assert calls["clean"] == 1 and not (out / ".steps").exists()
    fresh = run(CurateConfig(inputs=[str(src)], out_dir=str(tmp_path / "fresh"), steps=steps))
    assert summary == fresh
    assert (out / "records.jsonl").read_text() == (tmp_path / "fresh" / "records.jsonl").read_text()
    assert (out / "removed.jsonl").read_text() == (tmp_path / "fresh" / "removed.jsonl").read_text()


def test_boilerplate_prefilter_literal_is_required_by_the_regex():
    from protege.curate.clean import required_literal

    assert required_literal(r"^\s*Copy code\s*$") == "Copy code"
    assert required_literal(r"^\s*\d+\s*/\s*\d+\s*$") == "/"
    assert required_literal("a|b") == "" and required_literal("(?i)copy") == "" and required_literal("(") == ""
    res = clean.apply([conv("q", "Intro\n2 / 2\nBody text\nRegenerate response")],
                      CleanStep(boilerplate=[r"^\s*\d+\s*/\s*\d+\s*$", r"(?i)^regenerate RESPONSE$"]))
    assert res.kept[0].messages[1]["content"] == "Intro\n\nBody text"


def test_records_read_loosely_are_validated_after_cleaning(tmp_path, monkeypatch):
    """Safety net: a record clean was allowed to repair but did not is listed as invalid, not written."""
    from protege.curate import pipeline
    from protege.curate.common import StepResult

    monkeypatch.setitem(pipeline.APPLY, "clean", lambda recs, opts, ctx: StepResult(list(recs)))
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "bad", "messages": [{"role": "user", "content": "q"},
                                                         {"role": "assistant", "content": ""}]}) + "\n"
                   + json.dumps(conv("fine question", "fine answer", "good").to_dict()) + "\n")
    summary = run(CurateConfig(inputs=[str(src)], out_dir=str(tmp_path / "o"), steps=[{"step": "clean"}, {"step": "quality"}]))
    removed = [json.loads(x) for x in (tmp_path / "o" / "removed.jsonl").read_text().splitlines()]
    assert removed == [{"id": "bad", "step": "validate", "reason": "invalid",
                        "detail": "`messages[1]`.content: empty content", "source": "in"}]
    assert [s["step"] for s in summary["steps"]] == ["clean", "validate", "quality"]
