"""`openai` teacher backend: any OpenAI-compatible HTTP API, async, bounded concurrency, retries.

`base_url` may list several endpoints serving the same model (e.g. one vLLM server per GPU): each gets
`concurrency` workers pulling from one queue, so a faster server takes more of the work, and a request
that fails transiently goes back on the queue for whichever endpoint is free next (a server that is down
costs its share of retries, not the run). One cache serves them all: it is keyed by model and request,
not by endpoint, so a resumed run pays for nothing twice whichever server answered first.

Transient failures (429, 408, 409, 5xx, timeouts, dropped or refused connections, a
garbled 200 body) are retried with exponential backoff and full jitter, honouring the
server's `Retry-After`. Errors a retry cannot fix (400, 401, 403, 404, 422, a URL
without scheme) stop the run at once with a message saying what to check. The API key
is read from the environment variable named in the config and only ever goes into the
`Authorization` header: never into the cache, manifests or messages.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import urlsplit

import httpx

from ..net import is_loopback
from .base import Teacher, TeacherError

if TYPE_CHECKING:
    from ..engine.sampling import SamplingParams
    from .base import OnDone

__all__ = ["OpenAITeacher", "DEFAULT_BASE_URL"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
_RETRY_STATUS = {408, 409, 425, 429}


def retryable(status: int) -> bool:
    """A status a retry may fix: rate limits, timeouts, conflicts and server errors."""
    return status in _RETRY_STATUS or status >= 500
_HINTS = {
    400: "the server rejected the request; check `model` and the sampling options",
    401: "authentication failed; set the API key in the environment variable named by `api_key_env`",
    403: "access denied; the API key may lack permission for this model",
    404: "not found; check `base_url` (it should end in /v1) and `model`",
    422: "the server rejected the request body; check `model` and the sampling options",
}


def _retry_after(response: httpx.Response | None) -> float | None:
    """Seconds the server asked us to wait (`Retry-After: 3` or an HTTP date), if it said."""
    if response is None:
        return None
    raw = response.headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _server_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        msg = err.get("message", err) if isinstance(err, dict) else err
        return str(msg)[:300]
    except ValueError:
        return response.text[:300]


def _body(kind: str, model: str, item: Any, p: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": int(p.max_new_tokens),
                            "temperature": float(p.temperature), "top_p": float(p.top_p)}
    if kind == "chat":
        body["messages"] = item
    else:
        body["prompt"] = item
    if getattr(p, "stop", None):
        body["stop"] = list(p.stop)[:4]  # the OpenAI API accepts at most 4 stop strings
    if getattr(p, "seed", None) is not None:
        body["seed"] = int(p.seed)
    if getattr(p, "top_k", 0):
        body["top_k"] = int(p.top_k)  # vLLM / llama.cpp extension; OpenAI ignores unknown sampling keys
    if getattr(p, "stop_token_ids", None):
        body["stop_token_ids"] = list(p.stop_token_ids)  # vLLM extension
    return body


def _parse(kind: str, data: Any) -> dict[str, Any]:
    """OpenAI response JSON -> {"text", "usage", "finish_reason"}; KeyError/TypeError/IndexError if malformed."""
    choice = data["choices"][0]
    text = choice["message"].get("content") if kind == "chat" else choice["text"]
    usage = data.get("usage") or {}
    finish = choice.get("finish_reason") or "stop"
    return {"text": text or "",
            "usage": {"prompt_tokens": int(usage.get("prompt_tokens") or 0),
                      "completion_tokens": int(usage.get("completion_tokens") or 0)},
            "finish_reason": "length" if finish == "length" else "stop"}


class OpenAITeacher(Teacher):
    backend = "openai"
    _warned_http = False

    @property
    def base_urls(self) -> list[str]:
        urls = self.config.base_url or DEFAULT_BASE_URL
        return [u.rstrip("/") for u in ([urls] if isinstance(urls, str) else urls)]

    @property
    def base_url(self) -> str:
        return self.base_urls[0]

    @property
    def name(self) -> str:
        urls = self.base_urls
        where = urls[0] if len(urls) == 1 else f"{len(urls)} endpoints ({urls[0]}, ...)"
        return f"openai:{self.config.model}@{where}"

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.config.api_key_env, "")
        if key and not self._warned_http:
            self._warned_http = True
            for base in self.base_urls:
                url = urlsplit(base)
                if url.scheme == "http" and not is_loopback(url.hostname or ""):
                    print(f"[protege] warning: teacher {self.name} sends the API key in ${self.config.api_key_env} "
                          f"over plain http to {url.hostname}; anyone on the path can read it (use https)",
                          file=sys.stderr, flush=True)
        # Local servers (vLLM, llama.cpp) need no key; send none rather than an empty bearer.
        return {"Authorization": f"Bearer {key}"} if key else {}

    def served_models(self) -> list[str]:
        """The model ids the (first) endpoint lists at `/models`."""
        url = f"{self.base_url}/models"
        try:
            response = httpx.get(url, headers=self._headers(), timeout=self.config.timeout)
        except httpx.HTTPError as err:
            raise TeacherError(f"cannot reach {url}: {type(err).__name__}: {err}") from None
        if response.status_code != 200:
            raise TeacherError(f"{url} answered HTTP {response.status_code}: {_server_message(response)}")
        try:
            return [str(m["id"]) for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise TeacherError(f"{url} did not answer with an OpenAI model list") from None

    def stream(self, messages: list[dict[str, str]], sampling: SamplingParams) -> Iterator[str]:
        """One chat reply over server-sent events (`stream: true`), from the first endpoint. No retries: a person
        is reading, and a retried stream would show its start twice. Closing the generator (Ctrl-C) closes the
        connection, which frees the server's slot."""
        url = f"{self.base_url}/chat/completions"
        body = _body("chat", self.config.model, messages, sampling) | {"stream": True}
        try:
            with httpx.Client(headers=self._headers(), timeout=self.config.timeout) as client, \
                    client.stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    response.read()
                    raise TeacherError(f"teacher {self.name}: HTTP {response.status_code}: {_server_message(response)}")
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, `event:` lines
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise TeacherError(f"teacher {self.name}: a stream event that is not JSON: {data[:100]!r}") from None
                    if isinstance(chunk, dict) and chunk.get("error"):
                        err = chunk["error"]
                        raise TeacherError(f"teacher {self.name}: {err.get('message', err) if isinstance(err, dict) else err}")
                    choices = chunk.get("choices") if isinstance(chunk, dict) else None
                    delta = (choices[0].get("delta") or {}).get("content") if choices else None
                    if delta:
                        yield delta
        except httpx.HTTPError as err:  # refused, reset, timed out
            raise TeacherError(f"teacher {self.name}: no reply from {url}: {type(err).__name__}: {err}") from None

    def _fetch(self, kind: str, items: list[Any], params: list[SamplingParams], on_done: OnDone) -> None:
        self._run(lambda: self._fetch_all(kind, items, params, on_done))

    @staticmethod
    def _run(coro_factory: Any) -> Any:
        """Run a coroutine to completion and return its value, also when called from inside an event loop
        (e.g. a server): then in a worker thread with its own loop."""
        try:
            asyncio.get_running_loop()
            in_loop = True
        except RuntimeError:
            in_loop = False
        if not in_loop:  # outside the except block: an error from the run is not chained to "no running loop"
            return asyncio.run(coro_factory())
        result: list[Any] = []
        error: list[BaseException] = []

        def target() -> None:
            try:
                result.append(asyncio.run(coro_factory()))
            except BaseException as err:  # noqa: BLE001 — re-raised in the caller's thread
                error.append(err)

        t = threading.Thread(target=target)
        t.start()
        t.join()
        if error:
            raise error[0]
        return result[0]

    async def _fetch_all(self, kind: str, items: list[Any], params: list[SamplingParams], on_done: OnDone) -> None:
        cfg = self.config
        urls = self.base_urls
        limits = httpx.Limits(max_connections=cfg.concurrency * len(urls), max_keepalive_connections=cfg.concurrency * len(urls))
        # (index, attempt, not before): a retried request waits its backoff, on whichever endpoint takes it.
        queue: asyncio.Queue[tuple[int, int, float]] = asyncio.Queue()
        for j in range(len(items)):
            queue.put_nowait((j, 0, 0.0))
        remaining = [len(items)]
        finished = asyncio.Event()
        failure: list[BaseException] = []
        last_error: dict[int, str] = {}
        strikes = {base: 0 for base in urls}  # consecutive failures per endpoint

        async def worker(client: httpx.AsyncClient, base: str) -> None:
            while True:
                j, attempt, not_before = await queue.get()
                wait = not_before - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                try:
                    value, error, response = await self._send(client, base, kind, _body(kind, cfg.model, items[j], params[j]))
                except TeacherError as err:  # a request no retry can fix: stop everything
                    failure.append(err)
                    finished.set()
                    return
                if value is not None:
                    strikes[base] = 0
                    self.stats[f"endpoint:{base}"] += 1
                    on_done(j, value)
                    remaining[0] -= 1
                    if not remaining[0]:
                        finished.set()
                    continue
                last_error[j] = f"{error} from {base}"
                if attempt == cfg.max_retries:
                    failure.append(TeacherError(
                        f"teacher {self.name}: gave up after {cfg.max_retries + 1} attempts ({last_error[j]}); the "
                        "server may be down or overloaded — raise `max_retries` or lower `concurrency`"))
                    finished.set()
                    return
                self.stats["retries"] += 1
                delay = self._delay(attempt, _retry_after(response))
                if len(urls) == 1:  # the request waits its backoff
                    queue.put_nowait((j, attempt + 1, time.monotonic() + delay))
                    continue
                # Several endpoints: the request goes straight back for another one to take, and this endpoint's
                # worker waits out its own backoff (growing while the endpoint keeps failing), so a server that is
                # down stops drawing requests instead of burning their retries.
                queue.put_nowait((j, attempt + 1, 0.0))
                strikes[base] += 1
                await asyncio.sleep(self._delay(min(strikes[base], 16) - 1, _retry_after(response)))

        async with httpx.AsyncClient(headers=self._headers(), timeout=cfg.timeout, limits=limits) as client:
            tasks = [asyncio.create_task(worker(client, base)) for base in urls for _ in range(cfg.concurrency)]
            try:
                if items:
                    await finished.wait()
            finally:
                # Done, or a hard error: finished answers are already cached; the rest is cancelled.
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        if failure:
            raise failure[0]

    async def _send(self, client: httpx.AsyncClient, base: str, kind: str, body: dict[str, Any]
                    ) -> tuple[dict[str, Any] | None, str, httpx.Response | None]:
        """One attempt: (answer, "", response) or (None, what went wrong, response) for a failure worth
        retrying; a failure no retry can fix raises TeacherError."""
        url = f"{base}/{'chat/completions' if kind == 'chat' else 'completions'}"
        try:
            response = await client.post(url, json=body)
        except httpx.UnsupportedProtocol:
            raise TeacherError(f"teacher {self.name}: bad base_url {base!r}; expected http(s)://host:port/v1") from None
        except httpx.TransportError as err:  # timeouts, refused / dropped connections, protocol errors
            return None, (f"{type(err).__name__}: {err}" if str(err) else type(err).__name__), None
        status = response.status_code
        if status == 200:
            try:
                return _parse(kind, response.json()), "", response
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                return None, "malformed 200 response", response
        if retryable(status):
            return None, f"HTTP {status}", response
        hint = _HINTS.get(status, "the server refused the request")
        raise TeacherError(f"teacher {self.name}: HTTP {status} from {url}: {_server_message(response)} — {hint}")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with "equal jitter" (half fixed, half random: spreads clients apart), or what the server asked."""
        if retry_after is not None:
            return min(retry_after, max(self.config.backoff_max, 600.0))
        cap = min(self.config.backoff_max, self.config.backoff_base * (2 ** attempt))
        return random.uniform(cap / 2, cap)
