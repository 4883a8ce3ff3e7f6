"""On-disk response cache for teachers: SQLite in WAL mode, one row per finished request.

Why SQLite: a generator may be `kill -9`ed at any moment. Each response is
committed the moment it arrives (one small transaction), WAL keeps readers and the
single writer from blocking each other, and a killed process loses at most the
requests that were still in flight — never a finished one. Keys are sha256 hashes
of the request (backend, model, messages or prompt, sampling), so the API key and
base URL never reach the file.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from ..files import json_digest

__all__ = ["ResponseCache", "request_key"]


def request_key(payload: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a request (what was asked, of whom, with which sampling)."""
    return json_digest(payload)


class ResponseCache:
    """`get(key) -> dict | None`, `put(key, value)`; `path=None` keeps everything in memory."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self._mem: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # check_same_thread=False: the async backend may hand results over from a worker thread;
            # the lock above serialises access.
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable against process kills (only an OS crash can lose the last commits).
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL)")
            self._db.commit()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            if key in self._mem:
                return self._mem[key]
            if self._db is None:
                return None
            row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        with self._lock:
            if self._db is None:
                self._mem[key] = value
                return
            self._db.execute("INSERT OR REPLACE INTO responses (key, value, created) VALUES (?, ?, ?)",
                             (key, json.dumps(value, ensure_ascii=False), time.time()))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            if self._db is None:
                return len(self._mem)
            return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
