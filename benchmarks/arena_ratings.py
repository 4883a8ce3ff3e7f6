"""Arena speed: the leaderboard for 100,000 votes over 20 models with 100 bootstrap rounds, and votes/s.

    python benchmarks/arena_ratings.py

Ratings: protege's `leaderboard` (BT on the aggregated win matrix, multinomial bootstrap) against the
method of FastChat's `compute_mle_elo` + `get_bootstrap_result`: one logistic-regression row per battle
(ties duplicated as a win each way), scikit-learn's LogisticRegression refit on every resampled set of
battles. Same synthetic votes for both; the ratings of the two fits are compared too.
Votes/s: 8 client threads POST votes to a real arena server on loopback (each vote after its own
`/api/next`), counted from SQLite at the end.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from protege.arena.ratings import INIT, SCALE, Vote, leaderboard  # noqa: E402


def synthetic(n_votes: int, n_models: int, seed: int = 0) -> list[Vote]:
    rng = np.random.default_rng(seed)
    theta = rng.normal(0, 1, n_models)
    models = [f"model-{i:02d}" for i in range(n_models)]
    pairs = rng.integers(0, n_models, (n_votes, 2))
    votes = []
    for i, j in pairs:
        if i == j:
            j = (i + 1) % n_models
        p = 1 / (1 + math.exp(theta[j] - theta[i]))
        u = rng.random()
        winner = "tie" if u < 0.1 else ("a" if u < 0.1 + 0.9 * p else "b")
        votes.append(Vote(models[i], models[j], winner))
    return votes


def fastchat_style(votes: list[Vote], rounds: int, seed: int = 0) -> np.ndarray:
    """FastChat's estimator as its code does it: per-battle logistic regression, refit per bootstrap round."""
    from sklearn.linear_model import LogisticRegression

    models = sorted({v.model_a for v in votes} | {v.model_b for v in votes})
    idx = {m: k for k, m in enumerate(models)}
    a = np.array([idx[v.model_a] for v in votes])
    b = np.array([idx[v.model_b] for v in votes])
    y = np.array([1 if v.winner == "a" else 0 for v in votes])
    tie = np.array([v.winner == "tie" for v in votes])

    def fit(sel: np.ndarray) -> np.ndarray:
        aa, bb, yy, tt = a[sel], b[sel], y[sel], tie[sel]
        # FastChat duplicates every battle; a tie is a win for A in the first copy and a loss in the second
        aa, bb = np.concatenate([aa, aa]), np.concatenate([bb, bb])
        yy = np.concatenate([np.where(tt, 1, yy), np.where(tt, 0, yy)])
        x = np.zeros((len(aa), len(models)))
        x[np.arange(len(aa)), aa] = math.log(10)
        x[np.arange(len(aa)), bb] = -math.log(10)
        lr = LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-6)  # unpenalised, as FastChat
        lr.fit(x, yy)
        return SCALE * lr.coef_[0] + INIT

    rng = np.random.default_rng(seed)
    full = fit(np.arange(len(votes)))
    for _ in range(rounds):
        fit(rng.integers(0, len(votes), len(votes)))
    return full - full.mean() + INIT


def votes_per_second(n_threads: int = 8, per_thread: int = 150) -> float:
    import json
    import tempfile

    import httpx

    from protege.arena.app import create_arena_app
    from protege.arena.db import ArenaDB
    from protege.serve import background_server

    pool = {f"q{p}": {"turns": [f"Question {p}?"], "category": "", "answers": {f"m{m}": [f"answer {m}"] for m in range(8)}}
            for p in range(400)}
    with tempfile.TemporaryDirectory() as tmp:
        db = ArenaDB(Path(tmp) / "bench.sqlite")
        with background_server(create_arena_app(db, pool, seed=0)) as url:
            clients = []
            battles: list[list[dict]] = []
            for _ in range(n_threads):
                c = httpx.Client(base_url=url, timeout=30)
                c.get("/")
                clients.append(c)
                battles.append([c.get("/api/next").json() for _ in range(per_thread)])  # pairs drawn beforehand

            def run(c: httpx.Client, bs: list[dict]) -> None:
                for b in bs:
                    c.post("/api/vote", content=json.dumps({"vote_id": b["battle_id"], "battle_id": b["battle_id"],
                                                             "winner": "left"}),
                           headers={"Content-Type": "application/json", "X-CSRF-Token": c.cookies.get("arena_csrf")})

            threads = [threading.Thread(target=run, args=(c, bs)) for c, bs in zip(clients, battles)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            dt = time.perf_counter() - t0
        stored = len(db.votes())
    assert stored == n_threads * per_thread, stored
    return stored / dt


def main() -> int:
    votes = synthetic(100_000, 20)
    t0 = time.perf_counter()
    board = leaderboard(votes, rounds=100)
    ours = time.perf_counter() - t0
    print(f"protege leaderboard, 100,000 votes, 20 models, 100 bootstrap rounds: {ours:.2f} s (goal <= 2 s)")
    try:
        t0 = time.perf_counter()
        theirs_ratings = fastchat_style(votes, rounds=100)
        theirs = time.perf_counter() - t0
    except ImportError:
        print("scikit-learn not installed (pip install 'protege[bench]'): FastChat-style fit skipped")
        theirs = None
    if theirs is not None:
        mine = {r["model"]: r["rating"] for r in board}
        models = sorted(mine)
        diff = max(abs(mine[m] - theirs_ratings[k]) for k, m in enumerate(models))
        print(f"FastChat-style (per-battle logistic regression, refit per round): {theirs:.2f} s; "
              f"max rating difference {diff:.3f}")
        print(f"ratings time ratio (FastChat-style / protege): {theirs / ours:.1f}x")
    vps = votes_per_second()
    print(f"vote endpoint: {vps:.0f} votes/s on loopback, 8 clients (goal >= 200): "
          f"{'met' if vps >= 200 else 'missed'}; ratio to goal {vps / 200:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
