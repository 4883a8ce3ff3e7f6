"""`protege serve`: an OpenAI-compatible server with continuous batching and a chat page.

`create_app(engine, model_name)` builds the FastAPI app; `background_server(app)` runs it on a free
loopback port in a thread (tests, benchmarks, and anyone who needs a real server in-process).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any, Iterator

from .api import APIError, create_app

__all__ = ["create_app", "APIError", "background_server", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def background_server(app: Any, host: str = "127.0.0.1", port: int | None = None,
                      timeout: float = 30.0, header_timeout_s: float = 10.0) -> Iterator[str]:
    """Run `app` under uvicorn (with `protocol.py`'s header deadline) in a daemon thread; yields its base URL."""
    import uvicorn

    from .protocol import guarded_protocol

    port = port or free_port(host)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                            http=guarded_protocol(header_timeout_s))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="protege-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
