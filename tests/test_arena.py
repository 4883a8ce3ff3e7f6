"""The arena: Bradley-Terry ratings against scipy and synthetic truth; the vote API over real HTTP and SQLite."""

from __future__ import annotations

import json
import math
import sqlite3
import threading

import httpx
import numpy as np
import pytest

from protege.arena.app import create_arena_app, load_pool
from protege.arena.db import MIGRATIONS, ArenaDB
from protege.arena.ratings import Vote, bootstrap_intervals, bradley_terry, leaderboard, win_matrix
from protege.serve import background_server


def test_bradley_terry_equals_a_direct_scipy_fit():
    from scipy.optimize import minimize

    votes = ([Vote("a", "b", "a")] * 7 + [Vote("a", "b", "b")] * 3 + [Vote("b", "c", "a")] * 6 +
             [Vote("b", "c", "tie")] * 2 + [Vote("a", "c", "a")] * 8 + [Vote("c", "a", "a")] * 2 + [Vote("a", "c", "bad")])
    models = ["a", "b", "c"]
    w = win_matrix(votes, models)
    assert w[1, 2] == 7 and w[2, 1] == 1  # ties are half wins; "bad" is no preference

    def nll(t):
        d = t[:, None] - t[None, :]
        return float((w * np.log1p(np.exp(-d))).sum())

    t = minimize(nll, np.zeros(3), method="BFGS", tol=1e-12).x
    expected = 1000 + 400 * (t - t.mean()) / math.log(10)
    assert np.allclose(bradley_terry(w), expected, atol=1e-3)


def test_bootstrap_intervals_cover_the_truth_and_recover_the_order():
    covered = total = ordered = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        theta = np.array([-1.0, -0.3, 0.4, 1.1])
        models = [f"m{i}" for i in range(4)]
        votes = []
        for _ in range(600):
            i, j = rng.choice(4, 2, replace=False)
            votes.append(Vote(models[i], models[j], "a" if rng.random() < 1 / (1 + math.exp(theta[j] - theta[i])) else "b"))
        true = 1000 + 400 * (theta - theta.mean()) / math.log(10)
        lo, hi = bootstrap_intervals(votes, models, rounds=100, seed=seed)
        covered += int(((lo <= true) & (true <= hi)).sum())
        total += 4
        ordered += [r["model"] for r in leaderboard(votes, rounds=20)] == ["m3", "m2", "m1", "m0"]
    assert covered / total >= 0.90, covered / total
    assert ordered >= 18


def _answers(tmp_path, models=("alpha-model", "beta-model", "gamma-model"), prompts=4):
    dirs = []
    for m in models:
        d = tmp_path / m
        d.mkdir()
        rows = []
        for p in range(prompts):
            text = f"Answer {p} from {m[:1]}: <script>alert(1)</script> **bold**"
            if m == "gamma-model" and p == 0:
                text = "As Gemma, a model trained by Google, I think so."
            rows.append({"id": f"q{p}", "category": "writing", "turns": [f"Question {p}?"], "answers": [text], "model": m})
        (d / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        dirs.append(str(d))
    return dirs


@pytest.fixture()
def arena(tmp_path):
    pool, excluded = load_pool(_answers(tmp_path))
    db = ArenaDB(tmp_path / "arena.sqlite")
    app = create_arena_app(db, pool, token=None, seed=0)
    with background_server(app) as url:
        yield url, db, excluded


def _rater(url):
    client = httpx.Client(base_url=url, timeout=30)
    assert client.get("/").status_code == 200
    return client


def _vote(client, battle, winner="left", vote_id=None, **headers):
    return client.post("/api/vote", json={"vote_id": vote_id or f"v-{battle['battle_id']}", "battle_id": battle["battle_id"],
                                          "winner": winner, "comment": ""},
                       headers={"X-CSRF-Token": client.cookies.get("arena_csrf"), **headers})


def test_identity_revealing_answers_are_excluded_with_a_reason(arena):
    _, _, excluded = arena
    assert excluded == [{"prompt_id": "q0", "model": "gamma-model", "reason": "names 'Gemma'"}]


def test_vote_flow_reveals_models_only_after_the_vote_and_counts_a_retry_once(arena):
    url, db, _ = arena
    client = _rater(url)
    battle = client.get("/api/next").json()
    assert "model" not in json.dumps(battle).replace("model_", "")  # anonymous until the vote
    r = _vote(client, battle, "right")
    assert r.status_code == 200 and set(r.json()["models"].values()) <= {"alpha-model", "beta-model", "gamma-model"}
    again = _vote(client, battle, "right")
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert len(db.votes()) == 1
    other = _vote(client, battle, "left", vote_id="another-id")
    assert other.status_code == 409 and len(db.votes()) == 1


def test_bad_votes_are_4xx_and_write_nothing(arena):
    url, db, _ = arena
    client = _rater(url)
    battle = client.get("/api/next").json()
    assert _vote(client, {"battle_id": "nope"}).status_code == 404
    assert _vote(client, battle, "maybe").status_code == 400
    r = client.post("/api/vote", content=b"{not json", headers={"Content-Type": "application/json",
                                                                 "X-CSRF-Token": client.cookies.get("arena_csrf")})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert _vote(client, battle, **{"X-CSRF-Token": "forged"}).status_code == 403
    stranger = _rater(url)
    assert _vote(stranger, battle).status_code == 403  # someone else's battle
    r = httpx.post(url + "/api/vote", content=json.dumps({"battle_id": battle["battle_id"]}),
                   headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    assert db.votes() == []


def test_a_rater_never_sees_the_same_pair_twice_and_cells_stay_balanced(arena):
    url, db, _ = arena
    client = _rater(url)
    seen = []
    while True:
        b = client.get("/api/next").json()
        if b.get("done"):
            break
        seen.append(b["battle_id"])
        assert _vote(client, b, "tie").status_code == 200
    # 4 prompts: q0 has 2 usable models (1 pair), q1-q3 have 3 (3 pairs each) -> 10 distinct cells.
    assert len(seen) == 10 and len(db.votes()) == 10


def test_twenty_concurrent_raters_give_the_exact_vote_count(arena):
    url, db, _ = arena
    errors = []

    def rater():
        try:
            client = _rater(url)
            for _ in range(5):
                b = client.get("/api/next").json()
                r = _vote(client, b, "left")
                if r.status_code != 200:
                    errors.append(r.text)
                _vote(client, b, "left")  # a retry of the same vote: counted once
        except Exception as err:  # noqa: BLE001
            errors.append(repr(err))

    threads = [threading.Thread(target=rater) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    con = sqlite3.connect(db.path)
    assert con.execute("SELECT count(*) FROM votes").fetchone()[0] == 100
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_a_token_restricts_the_arena(tmp_path):
    pool, _ = load_pool(_answers(tmp_path))
    app = create_arena_app(ArenaDB(tmp_path / "a.sqlite"), pool, token="s3cret", seed=0)
    with background_server(app) as url:
        assert httpx.get(url + "/").status_code == 403
        assert httpx.get(url + "/?token=wrong").status_code == 403
        assert httpx.get(url + "/api/next").status_code == 403
        client = httpx.Client(base_url=url, follow_redirects=True)
        assert client.get("/?token=s3cret").status_code == 200
        assert "battle_id" in client.get("/api/next").json()


XSS = ('<script>window.__pwned = 1</script> <img src=x onerror="window.__pwned = 2"> '
       '[click](javascript:window.__pwned=3) **bold**')


def _wait(driver, js, timeout=20):
    import time

    deadline = time.monotonic() + timeout
    while not driver.execute_script(js):
        assert time.monotonic() < deadline, js
        time.sleep(0.05)


def test_page_vote_flow_blind_until_vote_inert_html_and_shortcuts(tmp_path):
    from browser import headless_chromium
    from selenium.webdriver.common.by import By

    dirs = []
    for m in ("alpha-model", "beta-model"):
        d = tmp_path / m
        d.mkdir()
        rows = [{"id": f"q{p}", "turns": [f"Question {p}?"], "answers": [f"{XSS} answer {p}"], "model": m} for p in range(3)]
        (d / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        dirs.append(str(d))
    pool, _ = load_pool(dirs)
    db = ArenaDB(tmp_path / "arena.sqlite")
    with background_server(create_arena_app(db, pool, seed=0)) as url, headless_chromium() as driver:
        driver.get(url + "/")
        _wait(driver, "return document.querySelector('#left .body').textContent.length > 0")
        html = driver.page_source
        assert "alpha-model" not in html and "beta-model" not in html  # blind until the vote
        left = driver.find_element(By.CSS_SELECTOR, "#left .body")
        assert "<script>window.__pwned = 1</script>" in left.text
        assert driver.execute_script("return document.querySelectorAll('#pair script, #pair img, #pair a').length") == 0
        assert driver.execute_script("return document.querySelector('#left strong').textContent") == "bold"
        assert driver.execute_script("return window.__pwned") is None
        driver.find_element(By.TAG_NAME, "body").send_keys("2")  # shortcut: B is better
        _wait(driver, "return !document.querySelector('#right .model').hidden")
        shown = {driver.find_element(By.CSS_SELECTOR, f"#{s} .model").text for s in ("left", "right")}
        assert shown == {"alpha-model", "beta-model"}
        votes = db.votes()
        assert len(votes) == 1 and votes[0]["winner"] == "right"
        driver.find_element(By.TAG_NAME, "body").send_keys("\n")  # Enter: next pair
        _wait(driver, "return document.querySelector('#right .model').hidden")
        driver.find_element(By.CSS_SELECTOR, "button[data-winner='tie']").click()
        _wait(driver, "return !document.querySelector('#right .model').hidden")
        assert [v["winner"] for v in db.votes()] == ["right", "tie"]
        assert driver.execute_script("return window.__pwned") is None


def test_kill_9_mid_traffic_loses_and_doubles_no_vote(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from protege.serve import free_port

    dirs = _answers(tmp_path, models=("alpha-model", "beta-model", "delta-model", "omega-model"), prompts=30)
    db_path = tmp_path / "arena.sqlite"
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def start():
        proc = subprocess.Popen([sys.executable, "-m", "protege.cli", "arena", *dirs, "--db", str(db_path),
                                 "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/api/stats", timeout=1).status_code == 200:
                    return proc
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError(proc.stderr.read().decode()[-2000:])

    proc = start()
    client = _rater(url)
    attempted: list[tuple[dict, str]] = []
    stop = threading.Event()

    def traffic():
        k = 0
        while not stop.is_set():
            try:
                b = client.get("/api/next").json()
            except httpx.HTTPError:
                return
            if b.get("done"):
                return
            k += 1
            attempted.append((b, ["left", "right", "tie", "bad"][k % 4]))
            try:
                _vote(client, b, attempted[-1][1])
            except httpx.HTTPError:
                return

    t = threading.Thread(target=traffic)
    t.start()
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGKILL)  # mid-traffic, no shutdown
    proc.wait()
    stop.set()
    t.join()
    assert len(attempted) > 5
    proc = start()
    try:
        for battle, winner in attempted:  # the client retries every vote it sent (same vote ids)
            assert _vote(client, battle, winner).status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
    votes = ArenaDB(db_path).votes()
    assert sorted(v["id"] for v in votes) == sorted(f"v-{b['battle_id']}" for b, _ in attempted)
    assert {v["battle_id"]: v["winner"] for v in votes} == {b["battle_id"]: w for b, w in attempted}


def test_random_raters_are_flagged_and_the_judge_is_compared(tmp_path):
    from protege.arena.analysis import judge_agreement, random_raters, win_rate_matrix

    rng = np.random.default_rng(0)
    theta = {"m0": -1.5, "m1": 0.0, "m2": 1.5}
    rows, k = [], 0
    for rater in ("honest-1", "honest-2", "honest-3", "coin"):
        for _ in range(60):
            a, b = rng.choice(list(theta), 2, replace=False)
            p = 1 / (1 + math.exp(theta[b] - theta[a]))
            left_wins = rng.random() < (0.5 if rater == "coin" else p)
            k += 1
            rows.append({"rater_id": rater, "model_left": a, "model_right": b, "winner": "left" if left_wins else "right",
                         "prompt_id": f"q{k % 5}", "category": ""})
    flagged = random_raters(rows)
    assert [f["rater_id"] for f in flagged] == ["coin"]
    rates = win_rate_matrix([Vote(r["model_left"], r["model_right"], "a" if r["winner"] == "left" else "b") for r in rows])
    assert rates["m2"]["m0"] > 0.7
    # A judge folder in `eval judge` pairwise form: agrees on q0 and q1, disagrees on q2, tie on q3.
    d = tmp_path / "judge"
    d.mkdir()
    (d / "judge_results.json").write_text(json.dumps({"models": ["m2", "m0"]}))
    (d / "judgments.jsonl").write_text("".join(json.dumps({"id": i, "outcome": o}) + "\n"
                                               for i, o in [("q0", "win"), ("q1", "win"), ("q2", "loss"), ("q3", "tie")]))
    human = [{"prompt_id": p, "model_left": "m2", "model_right": "m0", "winner": "left", "rater_id": "h"}
             for p in ("q0", "q1", "q2", "q3")]
    got = judge_agreement(human, [str(d)])
    assert got["pairs"] == 4 and got["decisive_pairs"] == 3 and got["agreement_without_ties"] == pytest.approx(2 / 3)
    assert got["cohen_kappa"] is not None and got["cohen_kappa"] < 1


def test_report_shows_human_ratings_next_to_the_judge(tmp_path):
    from protege.report import ReportConfig, run

    db = ArenaDB(tmp_path / "arena.sqlite")
    rid = db.new_rater()
    for k in range(12):
        bid = db.add_battle(rid, f"q{k % 4}", "", "alpha", "beta")
        db.vote(f"v{k}", bid, rid, "left" if k % 3 else "tie")
    out = tmp_path / "report.html"
    run(ReportConfig(inputs=[str(tmp_path / "arena.sqlite")], output=str(out)))
    page = out.read_text()
    assert "People (blind A/B votes)" in page and "12 votes" in page
    md = (tmp_path / "report.md").read_text()
    assert "| alpha |" in md and "95% interval" in md


def test_export_and_stats_never_create_convert_or_overwrite_a_database(tmp_path, capsys):
    """Issue 31: `export DB --out DB` overwrote the votes; a missing DB was created (exit 0); `stats` wrote a
    schema into an empty file and gave a traceback on a non-database file; CSV cells could be formulas."""
    import csv

    from protege.cli import main as cli_main

    db_path = tmp_path / "votes.sqlite"
    db = ArenaDB(db_path)
    rater = db.new_rater()
    battle = db.add_battle(rater, "p1", "general", "a", "b")
    db.vote("v1", battle, rater, "left", comment="=HYPERLINK(\"http://x\",\"y\")")
    before = db_path.read_bytes()
    assert cli_main(["arena", "export", str(db_path), "--out", str(db_path)]) == 1
    assert "is the vote database itself" in capsys.readouterr().err
    assert db_path.read_bytes() == before and len(ArenaDB.existing(db_path).votes()) == 1
    missing = tmp_path / "missing.sqlite"
    assert cli_main(["arena", "export", str(missing), "--out", str(tmp_path / "v.jsonl")]) == 1
    assert not missing.exists() and "no such arena database" in capsys.readouterr().err
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    assert cli_main(["arena", "stats", str(empty)]) == 1
    assert empty.read_bytes() == b"" and "not an arena database" in capsys.readouterr().err
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database at all, just text " * 100)
    assert cli_main(["arena", "stats", str(junk)]) == 1
    assert "not an arena database" in capsys.readouterr().err
    out = tmp_path / "votes.csv"
    assert cli_main(["arena", "export", str(db_path), "--out", str(out)]) == 0
    row = next(csv.DictReader(out.open(encoding="utf-8")))
    assert row["comment"].startswith("'=HYPERLINK") and row["winner"] == "left"


def test_polling_next_shows_the_unvoted_pair_again_instead_of_adding_battles(arena):
    """Issue 31 (LOW): every /api/next wrote a new battle row, so a reload loop grew the database."""
    url, db, _ = arena
    client = _rater(url)
    first = client.get("/api/next").json()
    assert all(client.get("/api/next").json() == first for _ in range(20))
    assert sum(db.battle_counts().values()) == 1
    assert _vote(client, first, "left").status_code == 200
    second = client.get("/api/next").json()
    assert second["battle_id"] != first["battle_id"] and sum(db.battle_counts().values()) == 2


def test_page_views_write_no_rater_rows_and_rater_cookies_cannot_be_forged(arena):
    """Issue 31 (LOW): every cookie-less GET / wrote a rater row. The rater cookie is now signed with the
    database's secret and the row is written when the rater first acts."""
    url, db, _ = arena
    count = lambda: db.conn().execute("SELECT COUNT(*) FROM raters").fetchone()[0]  # noqa: E731
    for _ in range(50):
        assert httpx.get(url + "/", timeout=10).status_code == 200
    assert count() == 0
    client = _rater(url)
    cookie = client.cookies["arena_rater"]
    rid, _, sig = cookie.partition(".")
    assert len(rid) == 32 and len(sig) == 32
    assert client.get("/api/next").status_code == 200 and count() == 1
    for forged in (f"{'0' * 32}.{sig}", f"{rid}.{'0' * 32}", "0" * 32, f"{rid}."):
        r = httpx.get(url + "/api/next", cookies={"arena_rater": forged}, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "no_rater", forged
    assert count() == 1
    assert ArenaDB(db.path).secret() == db.secret()  # kept in the database: a restarted arena knows its raters
