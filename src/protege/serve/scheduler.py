"""Continuous batching: one thread owns the engine and steps every running request together.

Why a thread and not an asyncio task: `engine.step()` is a blocking forward pass (tens of ms on
CPU); running it on the event loop would stall every HTTP connection. The thread admits waiting
requests and applies cancellations *between* decode steps, so requests join and leave the running
batch without waiting for each other, and a client that disconnects frees its slot before the
next step. Each request's outputs are handed back to the asyncio loop through its own queue.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..engine.core import RequestDriver
    from ..engine.sampling import SamplingParams

__all__ = ["Scheduler", "Request", "SchedulerStats"]

log = logging.getLogger("protege.serve")


@dataclass
class Request:
    """One generation the server is waiting on. `events` receives `(request, item)` pairs where item is a
    StepOutput, then None (done), or an Exception if the engine failed. Several requests (the `n`
    choices of one API call) may share one `events` queue."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: int = 0
    engine_id: int | None = None
    done: bool = False
    queued: bool = True  # counted in the scheduler's wait queue until admitted or cancelled

    def _emit(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (self, item))


@dataclass
class SchedulerStats:
    """Counters for /health and tests: `active` = requests in the engine's batch right now."""

    active: int = 0
    waiting: int = 0
    finished: int = 0
    cancelled: int = 0
    steps: int = 0
    max_active_seen: int = 0


class Scheduler:
    """Owns `engine` on a background thread; `submit` from the event loop, `cancel` from anywhere.

    `max_waiting` bounds the requests waiting for a batch slot: past it `reserve` says no and the
    server answers 429, instead of queueing without end (each waiting request holds its prompt, and
    its client's patience runs out long before the queue does).
    """

    def __init__(self, engine: RequestDriver, max_batch: int = 16, max_waiting: int = 256):
        self.engine = engine
        self.max_batch = max(1, int(max_batch))
        self.max_waiting = max(1, int(max_waiting))
        self._queued = 0
        self._lock = threading.Lock()
        self.stats = SchedulerStats()
        self._ids = itertools.count(1)
        self._inbox: queue.Queue[tuple[str, Request]] = queue.Queue()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: dict[int, Request] = {}  # engine request id -> Request
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ---- called from the event loop ------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="protege-scheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))  # type: ignore[arg-type]
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def reserve(self, n: int) -> bool:
        """Room for `n` more waiting requests? If so they are counted now (submit them next)."""
        with self._lock:
            if self._queued + n > self.max_waiting:
                return False
            self._queued += n
            return True

    @property
    def queued(self) -> int:
        return self._queued

    def submit(self, prompt_ids: list[int], params: SamplingParams, events: asyncio.Queue | None = None,
               reserved: bool = False) -> Request:
        """Queue a generation; read `events` until this request's None. Must be called on the event loop.

        `reserved`: its wait-queue place was taken by `reserve`; otherwise it is counted here."""
        self.start()
        if not reserved:
            with self._lock:
                self._queued += 1
        req = Request(list(prompt_ids), params, asyncio.get_running_loop(), id=next(self._ids))
        if events is not None:
            req.events = events
        self._inbox.put(("add", req))
        return req

    def _dequeue(self, req: Request) -> None:
        if req.queued:
            req.queued = False
            with self._lock:
                self._queued -= 1

    def cancel(self, req: Request) -> None:
        """Drop a request (client went away): its slot is free before the engine's next step."""
        if not req.done:
            self._inbox.put(("cancel", req))

    # ---- the engine thread ---------------------------------------------------------------------

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                kind, req = item
                if kind == "add":
                    self._waiting.append(req)
                elif kind == "cancel":
                    self._cancel_now(req)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _cancel_now(self, req: Request) -> None:
        if req.done:
            return
        req.done = True
        self.stats.cancelled += 1
        if req.engine_id is not None and req.engine_id in self._running:
            del self._running[req.engine_id]
            self.engine.cancel(req.engine_id)
        else:
            try:
                self._waiting.remove(req)
                self._dequeue(req)
            except ValueError:
                pass  # still in the inbox behind this cancel: skipped (and dequeued) on admission
        req._emit(None)

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_batch:
            req = self._waiting.popleft()
            self._dequeue(req)
            if req.done:
                continue
            try:
                req.engine_id = self.engine.add_request(req.prompt_ids, req.params)
            except Exception as err:  # noqa: BLE001 — a bad request must not kill the server
                req.done = True
                req._emit(err)
                continue
            self._running[req.engine_id] = req
        self._update_counts()

    def _update_counts(self) -> None:
        self.stats.active = len(self._running)
        self.stats.waiting = len(self._waiting)
        self.stats.max_active_seen = max(self.stats.max_active_seen, self.stats.active)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as err:  # noqa: BLE001 — fail the batch, keep serving
            log.exception("engine step failed; failing %d running requests", len(self._running))
            for rid, req in list(self._running.items()):
                req.done = True
                req._emit(err)
                try:
                    self.engine.cancel(rid)
                except Exception:  # noqa: BLE001
                    pass
            self._running.clear()
            return
        self.stats.steps += 1
        for out in outputs:
            req = self._running.get(out.request_id)
            if req is None:
                continue  # cancelled between steps
            req._emit(out)
            if out.finished is not None:
                req.done = True
                del self._running[out.request_id]
                self.stats.finished += 1
                req._emit(None)

    def _loop(self) -> None:
        while not self._stop.is_set():
            idle = not self._running and not self._waiting
            self._drain_inbox(block=idle)
            self._admit()
            if self._running:
                self._step()
                self._update_counts()
        self._drain_inbox(block=False)
        for req in list(self._running.values()) + list(self._waiting):
            self._cancel_now(req)
