"""uvicorn's h11 protocol with two things it lacks: a deadline for request headers, and errors in OpenAI's
JSON shape for requests too malformed to reach the app.

uvicorn times out idle keep-alive connections, but any byte resets that timer, so a client that sends
its headers one byte every few seconds holds a connection (and a file descriptor) forever; fifty such
clients held theirs for 130 s in a probe. Here the headers of each request must be complete within
`header_timeout_s` of the connection opening (or of the previous response), else the client gets a 408
and the connection is closed. (The body has its own deadline, `Guard.body_timeout_s`.)
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from .guard import error_payload

__all__ = ["guarded_protocol", "run"]


class _GuardedH11(H11Protocol):
    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._headers_timer: asyncio.TimerHandle | None = None
        self._arm_headers()

    def _arm_headers(self) -> None:
        self._disarm_headers()
        self._headers_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm_headers(self) -> None:
        timer = getattr(self, "_headers_timer", None)
        if timer is not None:
            timer.cancel()
            self._headers_timer = None

    def _in_flight(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_flight():  # the headers are in: the request is the app's (and the body deadline's) now
            self._disarm_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._in_flight():
            self._arm_headers()  # the next request on this keep-alive connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_headers()
        super().connection_lost(exc)

    def _headers_late(self) -> None:
        self._headers_timer = None
        if self._in_flight() or self.transport.is_closing():
            return
        self._answer_and_close(b"408 Request Timeout", error_payload(
            f"the request headers did not arrive within {self.header_timeout_s:g} s", "request_timeout", "timeout", None))

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse: OpenAI's error shape (clients print `message`), not plain text."""
        self._answer_and_close(b"400 Bad Request", error_payload(msg, "invalid_http_request", "invalid_request_error", None))

    def _answer_and_close(self, status: bytes, payload: dict[str, Any]) -> None:
        """Write a JSON error response by hand and close. By hand because h11 will not frame a response to a
        request it has not parsed (headers still arriving, or unparseable), and the connection ends anyway."""
        body = json.dumps(payload).encode()
        self.transport.write(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, len(body), body))
        self.transport.close()


def guarded_protocol(header_timeout_s: float = 10.0) -> type[H11Protocol]:
    """The protocol class for `uvicorn.Config(http=...)`, with this header deadline."""
    return type("GuardedH11Protocol", (_GuardedH11,), {"header_timeout_s": float(header_timeout_s)})


def run(app: Any, host: str, port: int, header_timeout_s: float = 10.0) -> None:
    """`uvicorn.run` with the guarded protocol (the commands that serve: `serve`, `arena`)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", http=guarded_protocol(header_timeout_s))
