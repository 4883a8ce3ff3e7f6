"""The arena web app: a rater sees a prompt and two anonymous answers, votes, then learns the models.

Answer sets come from `protege eval answer` folders. Pairs are drawn to balance (prompt, model pair)
cells: the least-shown cell this rater has not seen yet, ties broken at random, sides randomised and
stored with the battle. Answers that name a model or its maker would unblind the vote; they are left
out, each with its reason (`excluded`).

Security, as the chat server: the serve guard (loopback Host, same Origin, JSON bodies, headers, CSP)
wraps the app; the rater is an anonymous id in an HttpOnly SameSite=Strict cookie; every POST needs
the double-submit CSRF token (cookie + `X-CSRF-Token` header); `token` restricts the page to a closed
group (open `/?token=T` once, or send `Authorization: Bearer T`).
"""

from __future__ import annotations

import hmac
import random
import re
import threading
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from ..serve.guard import Guard, GuardMiddleware, bearer_token, error_payload
from .db import ArenaDB, VoteError
from .ratings import Vote, leaderboard

__all__ = ["load_pool", "create_arena_app", "REVEALING"]

WEB_DIR = Path(__file__).parent / "web"
SERVE_WEB = Path(__file__).parent.parent / "serve" / "web"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
# Names that unblind a vote when an answer says them ("As Gemma, ...", "I was trained by OpenAI").
REVEALING = ["gemma", "smollm", "google", "deepmind", "openai", "chatgpt", "gpt-4", "gpt-3", "claude", "anthropic",
             "llama", "meta ai", "qwen", "alibaba", "mistral", "hugging face", "huggingface", "vicuna", "alpaca"]


def load_pool(answer_dirs: list[str]) -> tuple[dict[str, dict[str, Any]], list[dict[str, str]]]:
    """{prompt_id: {"turns", "category", "answers": {model: [answer per turn]}}} and the exclusions."""
    from ..evaluate.answer import read_answers

    rows = [r for d in answer_dirs for r in read_answers(d)]
    models = sorted({str(r.get("model")) for r in rows})
    names = sorted({*REVEALING, *(m.lower() for m in models if len(m) > 3)}, key=len, reverse=True)
    pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in names) + r")\b", re.IGNORECASE)
    pool: dict[str, dict[str, Any]] = {}
    excluded: list[dict[str, str]] = []
    for r in rows:
        pid, model = str(r.get("id")), str(r.get("model"))
        answers = [a for a in r.get("answers") or [] if isinstance(a, str)]
        if not answers:
            excluded.append({"prompt_id": pid, "model": model, "reason": "no answer"})
            continue
        hit = next((m for m in (pattern.search(a) for a in answers) if m), None)
        if hit:
            excluded.append({"prompt_id": pid, "model": model, "reason": f"names {hit.group(0)!r}"})
            continue
        entry = pool.setdefault(pid, {"turns": r.get("turns") or [], "category": r.get("category") or "", "answers": {}})
        entry["answers"][model] = answers
    return pool, excluded


class _Arena:
    def __init__(self, db: ArenaDB, pool: dict[str, dict[str, Any]], seed: int | None):
        self.db, self.pool = db, pool
        self.rng = random.Random(seed)
        self.lock = threading.Lock()

    def next_battle(self, rater: str) -> dict[str, Any] | None:
        with self.lock:  # pair choice reads counts, then writes the battle: one rater page at a time
            # A reload (or a script polling /api/next) gets the pair it has not voted on yet, not a new
            # battle row per request.
            shown = self.db.open_battle(rater)
            if shown is not None and shown["prompt_id"] in self.pool:
                entry = self.pool[shown["prompt_id"]]
                if shown["model_left"] in entry["answers"] and shown["model_right"] in entry["answers"]:
                    return {"battle_id": shown["id"], "turns": entry["turns"],
                            "left": entry["answers"][shown["model_left"]],
                            "right": entry["answers"][shown["model_right"]]}
            seen = self.db.seen(rater)
            counts = self.db.battle_counts()
            cells = [(pid, a, b) for pid, e in self.pool.items()
                     for i, a in enumerate(sorted(e["answers"])) for b in sorted(e["answers"])[i + 1:]]
            fresh = [c for c in cells if c not in seen]
            if not fresh:
                return None
            low = min(counts.get(c, 0) for c in fresh)
            pid, a, b = self.rng.choice([c for c in fresh if counts.get(c, 0) == low])
            left, right = (a, b) if self.rng.random() < 0.5 else (b, a)
            entry = self.pool[pid]
            bid = self.db.add_battle(rater, pid, entry["category"], left, right)
        return {"battle_id": bid, "turns": entry["turns"], "left": entry["answers"][left],
                "right": entry["answers"][right]}


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_payload(message, code), status_code=status)


def create_arena_app(db: ArenaDB, pool: dict[str, dict[str, Any]], token: str | None = None,
                     seed: int | None = None, guard: Guard | None = None) -> FastAPI:
    arena = _Arena(db, pool, seed)
    app = FastAPI(title="protege arena", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.arena = arena

    def access_ok(request: Request) -> bool:
        if not token:
            return True
        header = request.headers.get("authorization", "")
        given = bearer_token(header)
        if given is None:
            given = request.cookies.get("arena_access", "")
        return bool(given) and hmac.compare_digest(given.encode(), token.encode())

    # The rater cookie is `id.signature` (HMAC of the id under the database's secret): a page view costs no
    # database row (one per cookie-less GET / was a write anyone could flood), and an id cannot be forged.
    secret = db.secret()

    def sign(rid: str) -> str:
        return f"{rid}.{hmac.new(secret, rid.encode(), 'sha256').hexdigest()[:32]}"

    def rater_of(request: Request) -> str | None:
        value = request.cookies.get("arena_rater", "")
        rid, _, _sig = value.partition(".")
        if rid and hmac.compare_digest(value.encode(), sign(rid).encode()):
            return rid
        return value if value and "." not in value and db.has_rater(value) else None  # unsigned: an older arena's

    @app.get("/", include_in_schema=False)
    async def page(request: Request) -> Any:
        if token and request.query_params.get("token"):
            if not hmac.compare_digest(request.query_params["token"].encode(), token.encode()):
                return _error(403, "wrong arena token", "bad_token")
            response: Any = RedirectResponse("/", status_code=303)
            response.set_cookie("arena_access", token, httponly=True, samesite="strict")
            return response
        if not access_ok(request):
            return PlainTextResponse("This arena is for invited raters: open the link with ?token=... you were given.",
                                     status_code=403)
        response = FileResponse(WEB_DIR / "arena.html")
        if rater_of(request) is None:
            response.set_cookie("arena_rater", sign(uuid.uuid4().hex), httponly=True, samesite="strict",
                                max_age=3600 * 24 * 365)
        if not request.cookies.get("arena_csrf"):
            response.set_cookie("arena_csrf", _token(), samesite="strict", max_age=3600 * 24 * 365)
        return response

    def gate(request: Request) -> str | JSONResponse:
        """The request's rater id, or the error response (token, then rater cookie)."""
        if not access_ok(request):
            return _error(403, "missing or wrong arena token", "bad_token")
        rater = rater_of(request)
        if rater is None:
            return _error(401, "no rater cookie: open the arena page first", "no_rater")
        db.ensure_rater(rater)
        return rater

    @app.get("/api/next")
    async def next_pair(request: Request) -> Any:
        rater = gate(request)
        if isinstance(rater, JSONResponse):
            return rater
        battle = arena.next_battle(rater)
        if battle is None:
            return JSONResponse({"done": True, "message": "You have rated every pair. Thank you!"})
        return JSONResponse(battle)

    @app.post("/api/vote")
    async def vote(request: Request) -> Any:
        rater = gate(request)
        if isinstance(rater, JSONResponse):
            return rater
        csrf = request.cookies.get("arena_csrf", "")
        if not csrf or not hmac.compare_digest(csrf.encode(), request.headers.get("x-csrf-token", "").encode()):
            return _error(403, "missing or wrong X-CSRF-Token header (reload the page)", "csrf")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body must be JSON: {vote_id, battle_id, winner, comment}", "bad_json")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object", "bad_json")
        fields = {k: body.get(k) for k in ("vote_id", "battle_id", "winner")}
        bad = [k for k, v in fields.items() if not isinstance(v, str) or not v or len(v) > 200]
        comment = body.get("comment", "")
        if bad or not isinstance(comment, str):
            return _error(400, f"field {(bad or ['comment'])[0]!r} must be a non-empty string", "bad_field")
        try:
            stored = db.vote(fields["vote_id"], fields["battle_id"], rater, fields["winner"], comment)
        except VoteError as err:
            return _error(err.status, str(err), "vote_refused")
        b = stored["battle"]
        return JSONResponse({"ok": True, "duplicate": stored["duplicate"],
                             "models": {"left": b["model_left"], "right": b["model_right"]}})

    @app.get("/api/stats")
    async def stats(request: Request) -> Any:
        if not access_ok(request):
            return _error(403, "missing or wrong arena token", "bad_token")
        return JSONResponse({"leaderboard": leaderboard(votes_of(db), rounds=100), "votes": len(db.votes())})

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    app.mount("/lib", StaticFiles(directory=SERVE_WEB), name="lib")  # markdown.js, shared with the chat page
    app.add_middleware(GuardMiddleware, guard=guard or Guard(json_prefixes=("/api/",)), csp=CSP)
    return app


def votes_of(db: ArenaDB) -> list[Vote]:
    """Stored votes as (left, right, winner) with winner in a/b/tie/bad."""
    side = {"left": "a", "right": "b", "tie": "tie", "bad": "bad"}
    return [Vote(v["model_left"], v["model_right"], side[v["winner"]]) for v in db.votes()]


def _token() -> str:
    import secrets

    return secrets.token_urlsafe(24)
