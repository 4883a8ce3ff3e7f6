"""What stands between the network and the engine: who may call, how big a request may be, headers.

A model server on 127.0.0.1 without a key is reachable by every web page the user opens: a page can
POST a `text/plain` body cross-origin without a CORS preflight, and with DNS rebinding
(`evil.example` resolving to 127.0.0.1) it can read the reply too. Three checks close that:

- `Host` must name this server: loopback names by default, the bound address, and `allowed_hosts`.
  A rebinding page's requests carry `Host: evil.example` and are refused.
- `Origin`, when a browser sends one, must be this server's own origin or one of `allowed_origins`.
- API bodies must be `Content-Type: application/json`: a browser cannot send that cross-origin
  without a preflight, which this server never approves.

The body limit holds before a byte is parsed: `GuardMiddleware` refuses a declared Content-Length
over it, `read_body` counts chunked bodies as they arrive, so one 20 MB request cannot stall
everyone's tokenisation.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from ..net import LOOPBACK_NAMES, is_loopback

__all__ = ["Guard", "GuardMiddleware", "KeyMiddleware", "bearer_token", "SECURITY_HEADERS", "error_payload", "APIError"]

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def error_payload(message: str, code: str | None = None, type: str = "invalid_request_error",
                  param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, for every refusal."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_payload(self.message, self.code, self.type, self.param)

    def response(self) -> JSONResponse:
        # The security headers are added to every response by GuardMiddleware.
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _hostname(value: str) -> str:
    """`Host` header value -> the name without port (`[::1]:8000` -> `::1`)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@dataclass
class Guard:
    """Request checks for one server. `bind` is the address it listens on."""

    bind: str = "127.0.0.1"
    allowed_hosts: list[str] = field(default_factory=list)
    allowed_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = 2 << 20
    # A client whose declared body is over the limit waits this long for its 413. It costs the server
    # nothing (a sleep, no read), and slows a flood of retries to a trickle: without it, 8 clients
    # resending 5 MB bodies in a loop took 0.7 of this machine's 2 cores and tripled normal latency.
    refuse_delay_s: float = 0.5
    # A body must arrive within this long: a client trickling bytes would otherwise hold its socket (and
    # its place in the prepare bound) forever. uvicorn times out neither headers nor bodies.
    body_timeout_s: float = 30.0
    json_prefixes: tuple[str, ...] = ("/v1/",)  # POSTs under these must be application/json

    def __post_init__(self) -> None:
        self._hosts = {h.lower().strip("[]") for h in (*LOOPBACK_NAMES, *self.allowed_hosts)}
        wildcard = self.bind in ("0.0.0.0", "::", "")
        if not wildcard:
            self._hosts.add(self.bind.lower().strip("[]"))
        # Bound to every interface, the server cannot know the names it is reached by; then the API
        # key (required beyond loopback unless the user opts out) is the protection, and Host is open
        # unless the user lists the names.
        self._any_host = wildcard and not self.allowed_hosts
        self._origins = {o.rstrip("/").lower() for o in self.allowed_origins}

    def host_ok(self, host_header: str | None) -> bool:
        if self._any_host:
            return True
        if not host_header:
            return False
        name = _hostname(host_header)
        return name in self._hosts or (is_loopback(name) and is_loopback(self.bind))

    def origin_ok(self, origin: str | None, host_header: str | None) -> bool:
        """No Origin (curl, SDKs) is fine; a browser's Origin must be our own or allowed."""
        if origin is None:
            return True
        origin = origin.rstrip("/").lower()
        if origin in self._origins or "*" in self._origins:
            return True
        parts = urlsplit(origin)
        return bool(host_header) and parts.scheme in ("http", "https") and parts.netloc == host_header.strip().lower()

    def check(self, headers: Any, path: str, method: str) -> tuple[int, str, str] | None:
        """(status, message, code) if the request must be refused before routing, else None."""
        host = headers.get("host")
        if not self.host_ok(host):
            return (421 if host else 400,
                    f"Host {host!r} is not one this server answers to (loopback names and "
                    f"{self.bind}; add names with --allowed-host)", "host_not_allowed")
        if not self.origin_ok(headers.get("origin"), host):
            return (403, f"Origin {headers.get('origin')!r} may not call this server (add it with "
                         "--allowed-origin)", "origin_not_allowed")
        if method == "POST" and path.startswith(self.json_prefixes):
            ctype = (headers.get("content-type") or "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return (415, f"Content-Type is {ctype or 'missing'!r}; send the body as JSON with "
                             "`Content-Type: application/json`", "unsupported_media_type")
        return None

    def too_large(self, headers: Any) -> tuple[int, str, str] | None:
        declared = headers.get("content-length")
        if declared is None:
            return None
        try:
            size = int(declared)
        except ValueError:
            return (400, f"Content-Length {declared!r} is not a number", "bad_content_length")
        if size > self.max_body_bytes:
            return (413, self._too_large_message(), "request_too_large")
        return None

    def _too_large_message(self) -> str:
        return (f"the request body is larger than this server's limit of {self.max_body_bytes:,} bytes "
                "(serve with --max-body-mb to change it)")

    async def read_body(self, request: Any) -> bytes:
        """The request body, or APIError(413) once a body without Content-Length passes the limit
        (a declared size over the limit never gets here: the middleware refuses it first)."""

        chunks, size = [], 0
        stream = request.stream().__aiter__()
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), deadline - asyncio.get_running_loop().time())
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise APIError(408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                               code="request_timeout", headers={"Connection": "close"}) from None
            size += len(chunk)
            if size > self.max_body_bytes:
                # `Connection: close`: stop reading now instead of draining megabytes to keep it alive.
                await asyncio.sleep(self.refuse_delay_s)
                raise APIError(413, self._too_large_message(), code="request_too_large",
                               headers={"Connection": "close"})
            chunks.append(chunk)
        return b"".join(chunks)


class GuardMiddleware:
    """Plain ASGI, outermost: refuses before routing (cheap enough for a flood) and adds the
    security headers to every response, the static files' included."""

    def __init__(self, app: Any, guard: Guard, csp: str):
        self.app, self.guard = app, guard
        api = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
        self._api_headers = api
        self._page_headers = [*api, (b"content-security-policy", csp.encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path, method = scope.get("path", ""), scope.get("method", "GET")
        refused = self.guard.check(headers, path, method) or (self.guard.too_large(headers) if method == "POST" else None)
        if refused is not None:
            status, message, code = refused
            if status == 413:
                await asyncio.sleep(self.guard.refuse_delay_s)
            body = json.dumps(error_payload(message, code)).encode()
            extra = [(b"connection", b"close")] if status == 413 else []
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                    *self._security(path), *extra]})
            await send({"type": "http.response.body", "body": body})
            return

        async def send_secured(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *((k, v) for k, v in self._security(path) if k not in present)]
            await send(message)

        await self.app(scope, receive, send_secured)

    def _security(self, path: str) -> list[tuple[bytes, bytes]]:
        # The page and its files also get the CSP: our own scripts only.
        return self._api_headers if path.startswith("/v1/") else self._page_headers


def bearer_token(header: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value (maybe ""); None for any other header."""
    return header[7:].strip() if header.lower().startswith("bearer ") else None


class KeyMiddleware:
    """`Authorization: Bearer <key>` on /v1/* (401 otherwise). Plain ASGI, not `@app.middleware("http")`:
    Starlette's BaseHTTPMiddleware wraps `receive`, and behind it a route never sees its client hang up
    (`Request.is_disconnected` stays False), so an abandoned request would keep its engine slot."""

    def __init__(self, app: Any, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
            given = bearer_token(header)
            if not given:
                err = APIError(401, "missing API key: send the header `Authorization: Bearer <key>`",
                               code="invalid_api_key")
                await err.response()(scope, receive, send)
                return
            if not hmac.compare_digest(given.encode(), self.key):
                await APIError(401, "incorrect API key", code="invalid_api_key").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
