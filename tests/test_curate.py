"""End-to-end curation on a seeded synthetic set with planted faults; count invariant; card in Chromium."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from protege.config import ConfigError, load_config
from protege.curate import CurateConfig, run
from protege.records import RecordError

EN = ("the a people water garden morning river small house friend kitchen window city light evening market "
      "quickly carefully usually always never often write explain describe compare improve build plan travel "
      "because although while before after during between about with without under over through important "
      "simple useful different several many every other new old good great little long short easy hard "
      "question answer problem idea reason example result method system student teacher family country "
      "music story history science number language computer program recipe weather season animal tree "
      "should could would will can might must make take give find keep learn think know want need help "
      "start finish choose follow open close read listen speak work play grow change move turn show try").split()
FR = ("le la les un une des avec pour dans sur sous mais donc parce que quand toujours jamais souvent "
      "maison jardin rivière ville fenêtre cuisine matin soir ami famille pays histoire musique enfant "
      "écrire expliquer décrire comparer construire voyager apprendre penser savoir vouloir pouvoir "
      "petit grand nouveau ancien beau facile difficile important simple utile nous vous ils elles "
      "être avoir faire aller venir prendre donner trouver garder aujourd'hui demain hier très aussi").split()
DE = ("der die das ein eine und oder aber weil wenn immer nie oft mit für ohne über unter zwischen "
      "Haus Garten Fluss Stadt Fenster Küche Morgen Abend Freund Familie Land Geschichte Musik Kind "
      "schreiben erklären beschreiben vergleichen bauen reisen lernen denken wissen wollen können "
      "klein groß neu alt schön einfach schwierig wichtig nützlich wir ihr sie sein haben machen "
      "gehen kommen nehmen geben finden behalten heute morgen gestern sehr auch nicht noch schon").split()
ZH = list("我们你他她是的了在有和不这那个人天水山家朋友城市早上晚上学习工作音乐历史科学语言电脑问题答案方法喜欢"
          "因为所以但是如果已经可以应该非常很多一些时候地方东西事情知道觉得认为希望需要开始结束")
TEACHER = ["As an AI language model, I cannot browse the internet.", "I am ChatGPT, a model trained by OpenAI.",
           "This answer was written by OpenAI's assistant.", "As an AI language model I have no opinions."]


def _sentence(rng: random.Random, vocab: list[str], n: int) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n))


def _conv(user: str, answer: str, rid: str) -> dict:
    return {"id": rid, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "source": "synthetic"}


def _edit(rng: random.Random, text: str, fraction: float) -> str:
    w = text.split()
    for _ in range(max(1, int(len(w) * fraction))):
        pos = rng.randrange(len(w))
        op = rng.random()
        if op < 0.5:
            w[pos] = rng.choice(EN)
        elif op < 0.75:
            w.insert(pos, rng.choice(EN))
        else:
            del w[pos]
    return " ".join(w)


def planted_dataset(tmp_path: Path, seed: int = 0) -> tuple[Path, Path, dict[str, set[str]], list[dict]]:
    """(train file, eval task file, {fault kind: ids}, base records). Every fault must be removed."""
    rng = random.Random(seed)
    faults: dict[str, set[str]] = {k: set() for k in
                                   ("exact", "near", "fr", "de", "zh", "teacher", "broken", "contaminated", "repaired")}
    base = [_conv(_sentence(rng, EN, rng.randint(12, 25)) + "?", _sentence(rng, EN, rng.randint(60, 120)) + ".", f"base{i:03d}")
            for i in range(200)]
    evals = [{"id": f"ev{i}", "question": _sentence(rng, EN, rng.randint(18, 30)) + "?"} for i in range(20)]
    rows = list(base)

    def add(kind: str, row: dict) -> None:
        faults[kind].add(row["id"])
        rows.append(row)

    for i in range(15):
        src = rng.choice(base)
        add("exact", {**src, "id": f"exact{i}"})
    for i, src in enumerate(rng.sample(base, 40)):
        frac = rng.uniform(0.02, 0.10)
        m = src["messages"]
        add("near", _conv(_edit(rng, m[0]["content"], frac), _edit(rng, m[1]["content"], frac), f"near{i}"))
    for lang, vocab, joiner in (("fr", FR, " "), ("de", DE, " "), ("zh", ZH, "")):
        for i in range(10):
            user = joiner.join(rng.choice(vocab) for _ in range(rng.randint(20, 30)))
            answer = joiner.join(rng.choice(vocab) for _ in range(rng.randint(40, 80)))
            add(lang, _conv(user, answer, f"{lang}{i}"))
    for i in range(12):
        answer = _sentence(rng, EN, 30) + ". " + rng.choice(TEACHER) + " " + _sentence(rng, EN, 30)
        add("teacher", _conv(_sentence(rng, EN, 15) + "?", answer, f"teacher{i}"))
    for i in range(6):  # nothing trainable: empty answers, whitespace, assistant-only, user-only
        msgs = [[{"role": "user", "content": _sentence(rng, EN, 12)}, {"role": "assistant", "content": ""}],
                [{"role": "user", "content": "   "}, {"role": "assistant", "content": "  \n "}],
                [{"role": "assistant", "content": _sentence(rng, EN, 20)}],
                [{"role": "user", "content": _sentence(rng, EN, 20)}]][i % 4]
        add("broken", {"id": f"broken{i}", "messages": msgs, "source": "synthetic"})
    for i in range(4):  # repairable: doubled user turn, stray leading assistant turn
        msgs = [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": _sentence(rng, EN, 20)},
                {"role": "user", "content": _sentence(rng, EN, 15)}, {"role": "assistant", "content": _sentence(rng, EN, 50)},
                {"role": "user", "content": "thanks"}]
        add("repaired", {"id": f"repaired{i}", "messages": msgs, "source": "synthetic"})
    for i, ev in enumerate(evals[:15]):  # pasted into a longer prompt (n-gram) or lightly paraphrased (BLEU)
        if i < 10:
            user = _sentence(rng, EN, 8) + ": " + ev["question"] + " " + _sentence(rng, EN, 6)
        else:
            user = _edit(rng, ev["question"], 0.15)
        add("contaminated", _conv(user, _sentence(rng, EN, 60), f"contam{i}"))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    eval_file = tmp_path / "eval_task.jsonl"
    eval_file.write_text("".join(json.dumps(e) + "\n" for e in evals), encoding="utf-8")
    return train, eval_file, faults, base


def _steps(eval_file: Path) -> list[dict]:
    return [{"step": "clean"}, {"step": "dedup"}, {"step": "language", "keep": ["en"]},
            {"step": "quality"}, {"step": "decontaminate", "eval_sets": [str(eval_file)]}]


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("planted")
    train, eval_file, faults, base = planted_dataset(tmp)
    cfg = CurateConfig(inputs=[str(train)], out_dir=str(tmp / "out"), steps=_steps(eval_file))
    summary = run(cfg)
    out = tmp / "out"
    return summary, out, faults, base, train


def test_every_planted_fault_removed_with_its_reason(planted_run):
    summary, out, faults, base, _ = planted_run
    removed = {e["id"]: e for e in _lines(out / "removed.jsonl")}
    kept = {r["id"] for r in _lines(out / "records.jsonl")}
    expected = {"exact": {"exact_duplicate"}, "near": {"near_duplicate", "exact_duplicate"}, "fr": {"language"},
                "de": {"language"}, "zh": {"language"}, "teacher": {"teacher_reference"},
                "broken": {"empty", "invalid"}, "contaminated": {"contamination"}}
    for kind, reasons in expected.items():
        ids = faults[kind]
        missed = sorted(i for i in ids if i not in removed)
        wrong = sorted(i for i in ids if i in removed and removed[i]["reason"] not in reasons)
        if kind == "near":   # the issue's bar: near-dup recall >= 0.95
            assert len(missed) <= 0.05 * len(ids), f"near-duplicates kept: {missed}"
        else:
            assert not missed, f"{kind}: not removed: {missed}"
        assert not wrong, f"{kind}: wrong reason: {[(i, removed[i]['reason']) for i in wrong]}"
        for i in ids & removed.keys():
            assert removed[i]["step"] and removed[i]["detail"]
    # precision: only planted faults are removed; every clean base record and repaired record survives
    planted = set().union(*(faults[k] for k in expected))
    false_removals = sorted(set(removed) - planted)
    assert not false_removals, [removed[i] for i in false_removals]
    near_removed = [i for i, e in removed.items() if e["reason"] == "near_duplicate"]
    assert sum(i in faults["near"] for i in near_removed) >= 0.95 * len(near_removed)
    assert {b["id"] for b in base} <= kept
    assert faults["repaired"] <= kept


def test_repaired_conversations_are_valid_and_end_with_the_answer(planted_run):
    _, out, faults, _, _ = planted_run
    from protege.records import check_messages

    for rec in _lines(out / "records.jsonl"):
        check_messages(rec["messages"], require_assistant_last=True)
        if rec["id"] in faults["repaired"]:
            assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]


def test_count_invariant_and_ids(planted_run):
    summary, out, _, _, train = planted_run
    ids_in = [r["id"] for r in _lines(train)]
    out_ids = [r["id"] for r in _lines(out / "records.jsonl")]
    removed_ids = [e["id"] for e in _lines(out / "removed.jsonl")]
    assert len(ids_in) == len(out_ids) + len(removed_ids)
    assert sorted(ids_in) == sorted(out_ids + removed_ids)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"in": len(ids_in), "out": len(out_ids), "removed": len(removed_ids), "added": 0}
    assert manifest["stage"] == "curate" and manifest["inputs"][0]["sha256"]


def test_contamination_report_names_eval_items(planted_run):
    _, out, faults, _, _ = planted_run
    card = (out / "card.md").read_text(encoding="utf-8")
    assert "## Contamination" in card and "eval_task.jsonl" in card
    removed = [e for e in _lines(out / "removed.jsonl") if e["reason"] == "contamination"]
    assert {e["id"] for e in removed} == faults["contaminated"]
    assert all("eval_task.jsonl:ev" in e["detail"] for e in removed)
    methods = {e["detail"].split(" with ")[0] for e in removed}
    assert any("BLEU" in m for m in methods) and any("13-gram" in m for m in methods)


def test_card_renders_in_headless_chromium(planted_run, tmp_path):
    from browser import headless_chromium
    from selenium.webdriver.common.by import By

    _, out, _, _, _ = planted_run
    html = (out / "card.html").read_text(encoding="utf-8")
    assert "<script" not in html and "data:image/png;base64," in html
    with headless_chromium() as driver:
        driver.get((out / "card.html").resolve().as_uri())
        shot = tmp_path / "card.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        rows = driver.find_element(By.ID, "counts").find_elements(By.TAG_NAME, "tr")
        cells = [[c.text for c in r.find_elements(By.CSS_SELECTOR, "td,th")] for r in rows]
        assert cells[0][:2] == ["step", "in"]
        assert [c[0] for c in cells[1:-1]] == ["read", "clean", "dedup", "language", "quality", "decontaminate"]
        manifest = json.loads((out / "manifest.json").read_text())
        assert cells[-1][1] == str(manifest["counts"]["in"]) and cells[-1][4] == str(manifest["counts"]["out"])
        assert driver.find_element(By.ID, "clusters").is_displayed()
        img = driver.find_element(By.TAG_NAME, "img")
        assert driver.execute_script("return arguments[0].naturalWidth", img) > 100


def test_card_escapes_record_text(tmp_path):
    evil = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    rows = [_conv("What is this markup? " + evil, "It is markup.", "a"), _conv("What is this markup? " + evil, "It is markup.", "b")]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(CurateConfig(inputs=[str(src)], out_dir=str(tmp_path / "o"), steps=[{"step": "dedup"}]))
    html = (tmp_path / "o" / "card.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_skip_invalid_lists_bad_lines_and_strict_mode_names_file_and_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(_conv("hello there friend", "hi", "ok1")) + "\n{broken json\n"
                   + json.dumps({"id": "noturns", "messages": "not a list"}) + "\n")
    with pytest.raises(RecordError, match=r"in.jsonl:2: bad JSON"):
        run(CurateConfig(inputs=[str(src)], out_dir=str(tmp_path / "o"), steps=[{"step": "quality"}]))
    summary = run(CurateConfig(inputs=[str(src)], out_dir=str(tmp_path / "o"), steps=[{"step": "clean"}],
                               skip_invalid=True))
    removed = _lines(tmp_path / "o" / "removed.jsonl")
    assert summary["in"] == 3 and summary["out"] == 1
    assert {e["id"] for e in removed} == {"in.jsonl:2", "noturns"}
    assert all(e["step"] == "read" and e["reason"] == "invalid" and "in.jsonl:" in e["detail"] for e in removed)


def test_missing_input_and_no_inputs_are_user_errors(tmp_path):
    from protege.errors import StageError

    with pytest.raises(StageError, match="no inputs"):
        run(CurateConfig(out_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        run(CurateConfig(inputs=[str(tmp_path / "nope.jsonl")], out_dir=str(tmp_path)))


def test_config_errors_name_the_key_and_suggest(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps:\n  - step: dedup\n    treshold: 0.7\n")
    with pytest.raises(ConfigError, match="did you mean `threshold`"):
        load_config(CurateConfig, cfg)
    cfg.write_text("steps:\n  - step: dedupe\n")
    with pytest.raises(ConfigError, match="did you mean `dedup`"):
        load_config(CurateConfig, cfg)
    cfg.write_text("stpes: []\n")
    with pytest.raises(ConfigError, match="did you mean `steps`"):
        load_config(CurateConfig, cfg)
    cfg.write_text("steps:\n  - clean\n  - step: language\n    keep: [en, de]\n")
    c = load_config(CurateConfig, cfg, ["--seed=3"])
    assert [s.step for s in c.steps] == ["clean", "language"] and c.steps[1].keep == ["en", "de"] and c.seed == 3


def test_cli_runs_with_config_and_overrides(tmp_path, capsys):
    from protege.cli import main

    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps([{"instruction": "Name a fruit that is red", "input": "", "output": "An apple."},
                               {"instruction": "Name a fruit that is red", "input": "", "output": "A cherry."}]))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps:\n  - step: clean\n  - step: dedup\n    near: false\n")
    assert main(["curate", str(src), "--out", str(tmp_path / "o"), "--config", str(cfg), "--card=false"]) == 0
    assert "2 records in, 1 out, 1 removed" in capsys.readouterr().out
    assert not (tmp_path / "o" / "card.html").exists()
    assert main(["curate", str(src), "--out", str(tmp_path / "o"), "--stepz=[]"]) == 2
    assert "did you mean `steps`" in capsys.readouterr().err


def test_alpaca_with_empty_output_is_removed_by_clean_not_an_error(tmp_path):
    src = tmp_path / "alpaca.jsonl"
    src.write_text(json.dumps({"instruction": "Say hi", "input": "", "output": ""}) + "\n"
                   + json.dumps({"instruction": "Say bye", "input": "politely", "output": "Goodbye!"}) + "\n")
    summary = run(CurateConfig(inputs=[str(src)], out_dir=str(tmp_path / "o"), steps=[{"step": "clean"}]))
    assert (summary["out"], summary["removed"]) == (1, 1)
    assert _lines(tmp_path / "o" / "removed.jsonl")[0]["reason"] == "empty"
    assert _lines(tmp_path / "o" / "records.jsonl")[0]["messages"][0]["content"] == "Say bye\n\npolitely"


def test_parquet_input_and_manifest_contamination(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    prompts = ["How warm is the sea in August near the northern coast", "Why do cats purr when they sleep",
               "Question number one about the weather today in the mountains"]
    rows = [{"id": f"p{i}", "messages": [{"role": "user", "content": p},
                                         {"role": "assistant", "content": "It is sunny and warm."}]} for i, p in enumerate(prompts)]
    src = tmp_path / "data.parquet"
    pd.DataFrame(rows).to_parquet(src)
    ev = tmp_path / "ev.jsonl"
    ev.write_text(json.dumps({"id": "q1", "prompt": "question number one about the weather today in the mountains"}) + "\n")
    summary = run(CurateConfig(inputs=[str(src)], out_dir=str(tmp_path / "o"),
                               steps=[{"step": "decontaminate", "eval_sets": [str(ev)]}]))
    assert (summary["in"], summary["out"]) == (3, 2)
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["contamination"]["eval_items_hit"] == ["ev.jsonl:q1"]


def test_cli_help_lists_every_step_kind(capsys):
    from protege.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["curate", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for kind in ("clean:", "split:", "dedup:", "language:", "quality:", "decontaminate:", "mix:", "tag:"):
        assert f"\n  {kind}\n" in text
