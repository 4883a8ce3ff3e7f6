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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .guard import Guard, GuardMiddleware, KeyMiddleware
from .logprobs import LogprobFormatter
from .request import (INT64, MAX_N, MAX_STOP, ROLES, SLOW_REFUSALS, APIError, ChatCompletionRequest,
                      engine_context_length, max_token_chars, message_text, refuse_too_many_messages,
                      refuse_unsupported, unicode_text, validation_error)
from .scheduler import Request as GenRequest
from .scheduler import Scheduler

if TYPE_CHECKING:
    from ..engine.core import RequestDriver
    from ..engine.sampling import SamplingParams

__all__ = ["create_app", "APIError", "ChatCompletionRequest"]

log = logging.getLogger("protege.serve")

WEB_DIR = Path(__file__).parent / "web"
# The page may only run our own script and style files: model output that slipped past the escaping
# would still not execute (defence in depth; the escaping in app.js is the first line).
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


class _Server:
    """Request handling shared by the routes; holds the engine's scheduler."""

    def __init__(self, engine: RequestDriver, model_name: str, max_batch: int, context_length: int | None,
                 default_max_tokens: int, max_waiting: int, request_timeout_s: float, max_messages: int = 1024,
                 model_aliases: tuple[str, ...] = ()):
        self.engine = engine
        self.model_name = model_name
        self.model_names = [model_name, *[a for a in model_aliases if a != model_name]]
        self.scheduler = Scheduler(engine, max_batch=max_batch, max_waiting=max_waiting)
        self.context_length = context_length or engine_context_length(engine)
        self.default_max_tokens = default_max_tokens
        self.request_timeout_s = request_timeout_s
        self.created = int(time.time())
        tok = getattr(engine, "tokenizer", None) or getattr(getattr(engine, "chat_format", None), "tokenizer", None)
        self.max_token_chars = max_token_chars(tok) if tok is not None else 0
        self.logprobs = LogprobFormatter(tok)
        # Parsing and tokenising a large body takes a second of CPU: never on the event loop (it
        # would stall every other client and /health), and at most two at a time.
        self.prepare_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="protege-prepare")
        # Requests being parsed/tokenised or waiting for the pool: bounded like the generation queue, so a
        # flood of huge bodies gets fast 429s instead of a queue that grows without end.
        self.preparing, self.max_preparing = 0, max(4, min(max_waiting, 32))
        self.max_messages = max_messages

    # ---- validation ----------------------------------------------------------------------------

    def prepare(self, body: dict[str, Any]) -> tuple[ChatCompletionRequest, list[int], Any]:
        """Validate a request body; return it, the prompt ids and the engine's SamplingParams."""
        from ..chat import ChatTemplateError
        from ..engine import SamplingParams

        if isinstance(body.get("messages"), list):  # before validating thousands of messages only to refuse them
            refuse_too_many_messages(len(body["messages"]), self.max_messages)
        try:
            req = ChatCompletionRequest.model_validate(body)
        except ValidationError as err:
            raise validation_error(err) from None
        refuse_unsupported(req)
        if req.model and "*" not in self.model_names and req.model not in self.model_names:
            served = ", ".join(f"`{n}`" for n in self.model_names)
            raise APIError(404, f"The model `{req.model}` does not exist; this server serves {served} (more "
                                "names: --served-model-name NAME, any name: --served-model-name '*')",
                           param="model", code="model_not_found")
        if not req.messages:
            raise APIError(400, "messages is empty: send at least one user message", param="messages")
        messages = []
        for i, m in enumerate(req.messages):
            role = "system" if m.role == "developer" else m.role  # newer OpenAI clients say "developer"
            if role not in ROLES:
                raise APIError(400, f"messages[{i}].role is {m.role!r}; expected one of "
                                    f"{', '.join(ROLES)}", param=f"messages[{i}].role")
            messages.append({"role": role, "content": message_text(m, i)})
        if not 0.0 <= req.temperature <= 2.0:
            raise APIError(400, f"temperature is {req.temperature}; expected 0..2", param="temperature")
        if not 0.0 < req.top_p <= 1.0:
            raise APIError(400, f"top_p is {req.top_p}; expected a number in (0, 1]", param="top_p")
        if req.top_k < 0:
            raise APIError(400, f"top_k is {req.top_k}; expected >= 0 (0 = off)", param="top_k")
        if not 1 <= req.n <= MAX_N:
            raise APIError(400, f"n is {req.n}; expected 1..{MAX_N}", param="n")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOP:
            raise APIError(400, f"stop has {len(stop)} strings; at most {MAX_STOP}", param="stop")
        stop = [unicode_text(s, "stop") for s in stop]
        if req.seed is not None and not -INT64 <= req.seed < INT64:
            raise APIError(400, f"seed is {req.seed}; expected a 64-bit signed integer", param="seed")
        chars = sum(len(m["content"]) for m in messages)
        if self.max_token_chars and chars > self.context_length * self.max_token_chars:
            raise APIError(400, f"the messages hold {chars:,} characters, more than this model's context of "
                                f"{self.context_length} tokens can hold; shorten the messages.",
                           param="messages", code="context_length_exceeded")
        try:
            prompt_ids = self.engine.chat_format.encode_prompt(messages)
        except ChatTemplateError as err:
            raise APIError(400, f"messages: {err}", param="messages") from None
        room = self.context_length - len(prompt_ids)
        if room < 1:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens; this model's context is "
                                f"{self.context_length} tokens, leaving no room for an answer. Shorten "
                                "the messages.", param="messages", code="context_length_exceeded")
        name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens, room)
        elif not 1 <= max_tokens <= room:
            raise APIError(400, f"{name} is {max_tokens}; expected 1..{room} (context {self.context_length} "
                                f"tokens minus the {len(prompt_ids)}-token prompt)", param=name)
        stop_strings = [s for s in stop if s] + [s for s in self.engine.chat_format.stop_strings if s not in stop]
        params = SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                top_k=req.top_k, stop=stop_strings, seed=req.seed,
                                logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        if req.logprobs:
            self.logprobs.content([])  # the token table is built here, in the prepare pool, not on the event loop
        return req, prompt_ids, params

    async def prepare_async(self, raw: bytes, deadline: float) -> tuple[ChatCompletionRequest, list[int], Any]:
        """`prepare` in the 2-thread pool, never on the event loop: 429 when too many wait for it, 504 when
        it runs past the request's deadline (its thread finishes on its own; the counter follows it)."""
        if self.preparing >= self.max_preparing:
            raise APIError(429, f"the server is busy: {self.preparing} requests are being prepared; retry shortly",
                           type="rate_limit_error", code="server_busy", headers={"Retry-After": "1"})
        self.preparing += 1
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.prepare_pool, _parse_and_prepare, self, raw)

        def done(_: Any) -> None:
            self.preparing -= 1

        fut.add_done_callback(done)  # runs on the loop thread: no lock needed
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout=max(0.01, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise self._timeout() from None

    def submit(self, prompt_ids: list[int], params: SamplingParams, n: int) -> tuple[list[GenRequest], asyncio.Queue]:
        """Submit the n choices sharing one event queue; choice i gets seed + i so they differ.

        A full wait queue is a 429 with Retry-After, as OpenAI's rate limits are: clients retry."""
        from dataclasses import replace

        if not self.scheduler.reserve(n):
            raise APIError(429, f"the server is busy: {self.scheduler.queued} requests are waiting "
                                f"(at most {self.scheduler.max_waiting}); retry shortly",
                           type="rate_limit_error", code="server_busy", headers={"Retry-After": "1"})
        events: asyncio.Queue = asyncio.Queue()
        reqs = []
        for i in range(n):
            p = params if i == 0 or params.seed is None else replace(params, seed=params.seed + i)
            reqs.append(self.scheduler.submit(prompt_ids, p, events, reserved=True))
        return reqs, events

    def _timeout(self) -> APIError:
        return APIError(504, f"the answer took longer than this server's limit of {self.request_timeout_s:g} s "
                             "per request; ask for fewer tokens (max_tokens) or retry", type="timeout",
                        code="request_timeout")

    # ---- responses -----------------------------------------------------------------------------

    async def complete(self, http: Request, req: ChatCompletionRequest, prompt_ids: list[int],
                       params: SamplingParams, deadline: float) -> JSONResponse:
        reqs, events = self.submit(prompt_ids, params, req.n)
        index = {r.id: i for i, r in enumerate(reqs)}
        texts = [""] * req.n
        logprobs: list[list[Any]] = [[] for _ in range(req.n)]
        finals: list[Any] = [None] * req.n
        open_ = req.n
        checked = time.monotonic()
        try:
            while open_:
                now = time.monotonic()
                if now > deadline:
                    raise self._timeout()
                # A client that hung up frees its slot now, not when its answer is done: asked every 0.25 s
                # whether tokens are flowing or not (vLLM aborts on disconnect too).
                if now - checked > 0.25:
                    checked = now
                    if await http.is_disconnected():
                        return JSONResponse({}, status_code=499)  # nobody is listening; finally cancels
                try:
                    r, item = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    continue
                if isinstance(item, Exception):
                    raise APIError(500, f"generation failed: {item}", type="server_error")
                if item is None:
                    open_ -= 1
                    continue
                texts[index[r.id]] += item.text_delta
                logprobs[index[r.id]] += item.logprobs or []
                if item.finished is not None:
                    finals[index[r.id]] = item.finished
        finally:
            for r in reqs:
                self.scheduler.cancel(r)
        choices, completion_tokens = [], 0
        for i, fin in enumerate(finals):
            text = fin.text if fin is not None else texts[i]
            completion_tokens += fin.completion_tokens if fin is not None else 0
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "logprobs": self.logprobs.choice(logprobs[i] if req.logprobs else None),
                            "finish_reason": fin.finish_reason if fin else "stop"})
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model_name, "system_fingerprint": None, "choices": choices,
            "usage": self._usage(len(prompt_ids), completion_tokens)})

    async def stream(self, req: ChatCompletionRequest, prompt_ids: list[int], reqs: list[GenRequest],
                     events: asyncio.Queue, deadline: float) -> AsyncIterator[str]:
        """SSE in OpenAI's chunk format for requests already admitted by `submit` (before the response's
        200 went out, so a full queue is a real 429); the `finally` cancels generation when the client
        disconnects."""
        index = {r.id: i for i, r in enumerate(reqs)}
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "system_fingerprint": None, "choices": choices, **extra}
            if include_usage and "usage" not in body:
                body["usage"] = None
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        completion_tokens, open_ = 0, req.n
        try:
            for i in range(req.n):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            while open_:
                try:
                    r, item = await asyncio.wait_for(events.get(), timeout=max(0.01, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    yield f"data: {json.dumps(self._timeout().body())}\n\n"
                    break
                i = index[r.id]
                if isinstance(item, Exception):
                    err = APIError(500, f"generation failed: {item}", type="server_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    break
                if item is None:
                    open_ -= 1
                    continue
                lp = self.logprobs.content(item.logprobs) if req.logprobs and item.logprobs else []
                if item.text_delta or lp:
                    yield chunk([{"index": i, "delta": {"content": item.text_delta},
                                  "logprobs": {"content": lp, "refusal": None} if req.logprobs else None,
                                  "finish_reason": None}])
                if item.finished is not None:
                    completion_tokens += item.finished.completion_tokens
                    yield chunk([{"index": i, "delta": {}, "logprobs": None,
                                  "finish_reason": item.finished.finish_reason}])
            if include_usage:
                yield chunk([], usage=self._usage(len(prompt_ids), completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            for r in reqs:
                self.scheduler.cancel(r)

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


def _parse_and_prepare(server: _Server, raw: bytes) -> tuple[ChatCompletionRequest, list[int], Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"could not parse the request body as JSON: {err}") from None
    except RecursionError:
        raise APIError(400, "the request body nests too deeply to parse") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return server.prepare(body)


def create_app(engine: RequestDriver, model_name: str, api_key: str | None = None, max_batch: int = 16,
               context_length: int | None = None, default_max_tokens: int = 1024, *,
               guard: Guard | None = None, max_waiting: int = 256, request_timeout_s: float = 600.0,
               max_messages: int = 1024, model_aliases: tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`.

    `api_key`: when set, /v1/* requires `Authorization: Bearer <key>` (401 otherwise); /health and the
    page stay open. `max_batch`: most requests decoded together (continuous batching); more wait, up
    to `max_waiting` (then 429). `context_length`: defaults to the model config's
    max_position_embeddings. `guard`: Host/Origin/Content-Type checks and the body limit (default:
    loopback names only, 2 MiB). `request_timeout_s`: a request still unanswered after this (preparation
    included) is cancelled. `max_messages`: longer message lists are refused with a 400. `model_aliases`:
    more names a request's `model` may give (`*`: any); another name is a 404 `model_not_found`, as OpenAI
    and vLLM answer. A request without `model` is served.
    """
    engine_cap = getattr(engine, "max_batch_size", None)
    if isinstance(engine_cap, int) and engine_cap > 0:
        max_batch = min(max_batch, engine_cap)
    server = _Server(engine, model_name, max_batch, context_length, default_max_tokens, max_waiting,
                     request_timeout_s, max_messages, tuple(model_aliases))
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
        if req.stream:
            # Admission first: a full queue must answer 429 + Retry-After like an unstreamed request, not a
            # 200 whose body never comes. The background task frees the slots even if the body never starts.
            reqs, events = server.submit(prompt_ids, params, req.n)
            release = BackgroundTask(lambda: [server.scheduler.cancel(r) for r in reqs])
            return StreamingResponse(server.stream(req, prompt_ids, reqs, events, deadline), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=release)
        return await server.complete(request, req, prompt_ids, params, deadline)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    app.add_middleware(GuardMiddleware, guard=guard, csp=PAGE_CSP)  # added last = outermost
    return app
