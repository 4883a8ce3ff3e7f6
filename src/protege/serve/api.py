"""OpenAI-compatible HTTP API over the engine: /v1/chat/completions, /v1/models, /health, the chat page.

The model's ChatFormat renders the messages, so the server feeds exactly the tokens training saw
for the same history. Every error uses OpenAI's JSON shape
`{"error": {"message", "type", "param", "code"}}` so OpenAI clients surface the message as is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .guard import Guard, GuardMiddleware, KeyMiddleware
from .request import (SLOW_REFUSALS, APIError, ChatCompletionRequest,
                      unicode_text, validation_error)
from .server import Server

if TYPE_CHECKING:
    from ..engine.core import RequestDriver
    from .moderation import Moderation

__all__ = ["create_app", "APIError", "ChatCompletionRequest"]

log = logging.getLogger("protege.serve")

WEB_DIR = Path(__file__).parent / "web"
# The page may only run our own script and style files: model output that slipped past the escaping
# would still not execute (defence in depth; the escaping in app.js is the first line).
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def create_app(engine: RequestDriver, model_name: str, api_key: str | None = None, max_batch: int = 16,
               context_length: int | None = None, default_max_tokens: int = 1024, *,
               guard: Guard | None = None, max_waiting: int = 256, request_timeout_s: float = 600.0,
               max_messages: int = 1024, model_aliases: tuple[str, ...] = (),
               moderation: Moderation | None = None) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`.

    `api_key`: when set, /v1/* requires `Authorization: Bearer <key>` (401 otherwise); /health and the
    page stay open. `max_batch`: most requests decoded together (continuous batching); more wait, up
    to `max_waiting` (then 429). `context_length`: defaults to the model config's
    max_position_embeddings. `guard`: Host/Origin/Content-Type checks and the body limit (default:
    loopback names only, 2 MiB). `request_timeout_s`: a request still unanswered after this (preparation
    included) is cancelled. `max_messages`: longer message lists are refused with a 400. `model_aliases`:
    more names a request's `model` may give (`*`: any); another name is a 404 `model_not_found`, as OpenAI
    and vLLM answer. A request without `model` is served. `moderation`: checks the last user message and/or
    the answers (`serve/moderation.py`); flagged ones end with finish_reason `content_filter`. With a local
    reward-model moderator the server also answers OpenAI's `/v1/moderations`.
    """
    engine_cap = getattr(engine, "max_batch_size", None)
    if isinstance(engine_cap, int) and engine_cap > 0:
        max_batch = min(max_batch, engine_cap)
    server = Server(engine, model_name, max_batch, context_length, default_max_tokens, max_waiting,
                     request_timeout_s, max_messages, tuple(model_aliases), moderation)
    guard = guard or Guard()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.scheduler.start()
        yield
        await asyncio.to_thread(server.scheduler.stop)
        server.prepare_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="protege", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.state.scheduler = server.scheduler

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError) -> JSONResponse:
        return validation_error(err).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return APIError(err.status_code, str(err.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> JSONResponse:
        # Anything not foreseen still answers in OpenAI's shape (clients show `message`), and is logged.
        log.error("unexpected error serving a request", exc_info=err)
        return APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error").response()

    if api_key:
        app.add_middleware(KeyMiddleware, api_key=api_key)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        s = server.scheduler.stats
        return {"status": "ok", "model": model_name, "active": s.active, "waiting": s.waiting,
                "finished": s.finished, "cancelled": s.cancelled, "max_batch": server.scheduler.max_batch}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": server.created,
                                            "owned_by": "protege", "context_length": server.context_length}
                                           for name in server.model_names if name != "*"]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        deadline = time.monotonic() + server.request_timeout_s  # preparation counts against the deadline
        raw = await guard.read_body(request)
        try:
            req, prompt_ids, params = await server.prepare_async(raw, deadline)
        except APIError as err:
            if err.code in SLOW_REFUSALS:
                # Oversized requests cost real work to refuse (read, parse, count); answering them at once lets a
                # client that resends in a loop take the GIL from the engine (benchmarks/serve_abuse.py). A
                # pause, as for an oversized body, costs no CPU and caps each such client at 2 refusals a second.
                await asyncio.sleep(guard.refuse_delay_s)
            raise
        if await server.input_flagged(req):
            return server.filtered(req, prompt_ids)
        if req.stream:
            # Admission first: a full queue must answer 429 + Retry-After like an unstreamed request, not a
            # 200 whose body never comes. The background task frees the slots even if the body never starts.
            reqs, events = server.submit(prompt_ids, params, req.n)
            release = BackgroundTask(lambda: [server.scheduler.cancel(r) for r in reqs])
            return StreamingResponse(server.stream(req, prompt_ids, reqs, events, deadline), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=release)
        return await server.complete(request, req, prompt_ids, params, deadline)

    if moderation is not None and hasattr(moderation.moderator, "model"):  # a local classifier: serve it too

        @app.post("/v1/moderations")
        async def moderations(request: Request) -> Any:
            try:
                body = json.loads(await guard.read_body(request))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
                raise APIError(400, f"could not parse the request body as JSON: {err}") from None
            texts = body.get("input") if isinstance(body, dict) else None
            texts = [texts] if isinstance(texts, str) else texts
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts) or len(texts) > 32:
                raise APIError(400, "input must be a string or a list of 1..32 strings", param="input")
            rid = f"modr-{uuid.uuid4().hex}"
            verdicts = [await moderation.check("endpoint", rid, [], unicode_text(t, "input")) for t in texts]
            return {"id": rid, "model": moderation.moderator.name, "results": [v.result() for v in verdicts]}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    app.add_middleware(GuardMiddleware, guard=guard, csp=PAGE_CSP)  # added last = outermost
    return app
