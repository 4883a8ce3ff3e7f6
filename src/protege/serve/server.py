"""The per-request flow of the OpenAI-compatible API: prepare (parse, validate, tokenise, off the event
loop) -> moderate the request -> admit (bounded queue, 429) -> complete or stream (SSE) -> moderate the answer.
`api.create_app` wires it to routes."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from .logprobs import LogprobFormatter
from .request import (INT64, MAX_N, MAX_STOP, APIError, ChatCompletionRequest,
                      engine_context_length, max_token_chars, refuse_too_many_messages, refuse_unsupported,
                      request_messages, response_schema, unicode_text, validation_error)
from .scheduler import Request as GenRequest
from .scheduler import Scheduler

if TYPE_CHECKING:
    from ..engine.core import RequestDriver
    from ..engine.sampling import SamplingParams
    from .moderation import Moderation

__all__ = ["Server"]


log = logging.getLogger("protege.serve")


class Server:
    """Request handling shared by the routes; holds the engine's scheduler."""

    def __init__(self, engine: RequestDriver, model_name: str, max_batch: int, context_length: int | None,
                 default_max_tokens: int, max_waiting: int, request_timeout_s: float, max_messages: int = 1024,
                 model_aliases: tuple[str, ...] = (), moderation: Moderation | None = None):
        self.engine = engine
        self.moderation = moderation
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
        messages = request_messages(req)
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
        schema = response_schema(req)
        if schema is not None:
            self._check_schema(schema)
        params = SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                top_k=req.top_k, stop=stop_strings, seed=req.seed,
                                logprobs=(req.top_logprobs or 0) if req.logprobs else None, json_schema=schema)
        if req.logprobs:
            self.logprobs.content([])  # the token table is built here, in the prepare pool, not on the event loop
        return req, prompt_ids, params

    def _check_schema(self, schema: str) -> None:
        from ..engine.structured import StructuredOutputError

        if not getattr(self.engine, "supports_structured_output", False):
            raise APIError(400, "response_format JSON modes need protege's torch engine; this server runs "
                                f"{type(self.engine).__name__} (serve the HF folder instead of the .gguf)",
                           param="response_format")
        try:
            self.engine.structured.check(schema)
        except StructuredOutputError as err:
            raise APIError(400, f"response_format: {err}", param="response_format") from None

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
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        choices, completion_tokens = [], 0
        for i, fin in enumerate(finals):
            text = fin.text if fin is not None else texts[i]
            completion_tokens += fin.completion_tokens if fin is not None else 0
            reason = fin.finish_reason if fin else "stop"
            if self._moderates("output") and (await self._verdict("output", cid, req, text)).flagged:
                text, reason, logprobs[i] = "", "content_filter", []
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "logprobs": self.logprobs.choice(logprobs[i] if req.logprobs else None),
                            "finish_reason": reason})
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": int(time.time()),
            "model": self.model_name, "system_fingerprint": None, "choices": choices,
            "usage": self._usage(len(prompt_ids), completion_tokens)})

    # ---- moderation --------------------------------------------------------------------------

    def _moderates(self, stage: str) -> bool:
        return self.moderation is not None and stage in self.moderation.stages

    async def _verdict(self, stage: str, rid: str, req: ChatCompletionRequest, text: str | None = None) -> Any:
        """The moderator's verdict on the last user message (input) or an answer (output), in its context."""
        assert self.moderation is not None
        messages = request_messages(req)
        if text is None:  # input: the last user message, with what came before it
            last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
            return await self.moderation.check(stage, rid, messages[:last], messages[last]["content"])
        return await self.moderation.check(stage, rid, messages, text)

    async def input_flagged(self, req: ChatCompletionRequest) -> bool:
        return self._moderates("input") and (await self._verdict("input", f"chatcmpl-{uuid.uuid4().hex}", req)).flagged

    def filtered(self, req: ChatCompletionRequest, prompt_ids: list[int]) -> Any:
        """The answer to a request whose input was flagged: no generation, every choice `content_filter`
        (OpenAI's finish reason for filtered content), streamed or not as asked."""
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": self.model_name,
                                 "system_fingerprint": None, "usage": self._usage(len(prompt_ids), 0),
                                 "choices": [{"index": i, "message": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": "content_filter"} for i in range(req.n)]})

        chunk = self._chunker(req, cid, created)

        def events() -> Any:
            for i in range(req.n):
                for delta, fin in (({"role": "assistant", "content": ""}, None), ({}, "content_filter")):
                    yield chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": fin}])
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], usage=self._usage(len(prompt_ids), 0))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def stream(self, req: ChatCompletionRequest, prompt_ids: list[int], reqs: list[GenRequest],
                     events: asyncio.Queue, deadline: float) -> AsyncIterator[str]:
        """SSE in OpenAI's chunk format for requests already admitted by `submit` (before the response's
        200 went out, so a full queue is a real 429); the `finally` cancels generation when the client
        disconnects."""
        index = {r.id: i for i, r in enumerate(reqs)}
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunk = self._chunker(req, cid, created)

        completion_tokens, open_ = 0, req.n
        # Output moderation holds text back until the moderator has passed it (see Moderation.window)
        moderated = self._moderates("output")
        sent, held, held_lp = [""] * req.n, [""] * req.n, [[] for _ in range(req.n)]
        cut: set[int] = set()
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
                if i in cut:
                    continue
                delta = item.text_delta
                lp = self.logprobs.content(item.logprobs) if req.logprobs and item.logprobs else []
                if moderated:
                    held[i] += delta
                    held_lp[i] += lp
                    if len(held[i]) < self.moderation.window and item.finished is None:  # type: ignore[union-attr]
                        continue
                    if held[i] and (await self._verdict("output", cid, req, sent[i] + held[i])).flagged:
                        cut.add(i)
                        self.scheduler.cancel(r)
                        if item.finished is not None:
                            completion_tokens += item.finished.completion_tokens
                        yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": "content_filter"}])
                        continue
                    delta, lp, held[i], held_lp[i] = held[i], held_lp[i], "", []
                    sent[i] += delta
                if delta or lp:
                    yield chunk([{"index": i, "delta": {"content": delta},
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

    def _chunker(self, req: ChatCompletionRequest, cid: str, created: int) -> Any:
        """`chunk(choices, **extra)`: one SSE event in OpenAI's chunk format for this response (every chunk says
        `usage: null` when the client asked for usage, as OpenAI's do)."""
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "system_fingerprint": None, "choices": choices, **extra}
            if include_usage and "usage" not in body:
                body["usage"] = None
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        return chunk

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


def _parse_and_prepare(server: Server, raw: bytes) -> tuple[ChatCompletionRequest, list[int], Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"could not parse the request body as JSON: {err}") from None
    except RecursionError:
        raise APIError(400, "the request body nests too deeply to parse") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return server.prepare(body)
