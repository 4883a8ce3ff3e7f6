"""`openai` teacher with `batch: true`: the requests go through OpenAI's Batch API (half the price of the
same requests sent one by one; answers within `completion_window`).

The flow is the API's own: the requests are written as a batch input file (one line per request:
`{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}`), uploaded to `/v1/files`
(purpose `batch`), a batch is created on `/v1/batches` and polled until it ends, and its output file
(`{"custom_id", "response": {"status_code", "body"}, "error"}` per line) is read back into the cache.

A killed run pays for nothing twice: the batch id of each input file (named by its sha256) is kept in
`teacher_batches.json` beside the cache, so a rerun polls the batch it already paid for instead of
creating another; a finished batch's answers are in the cache and are never asked for again. Requests the
batch could not answer (its error file, an expired batch) are sent one by one as the plain backend would.
Batches hold at most 50,000 requests (the API's limit); more are split.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, TYPE_CHECKING

import httpx

from ..files import atomic_write_json, json_lines
from .base import TeacherError
from .openai_api import OpenAITeacher, _body, _parse, _server_message, retryable

if TYPE_CHECKING:
    from ..engine.sampling import SamplingParams
    from .base import OnDone, TeacherConfig

__all__ = ["OpenAIBatchTeacher", "BATCH_STATE_FILE", "MAX_BATCH"]

BATCH_STATE_FILE = "teacher_batches.json"
MAX_BATCH = 50_000
_ENDED = ("completed", "failed", "expired", "cancelled")


class OpenAIBatchTeacher(OpenAITeacher):
    backend = "openai"  # the same answers as the plain backend: the cache is shared with it

    def __init__(self, config: TeacherConfig, cache_dir: str | Path | None = None):
        super().__init__(config, cache_dir)
        self.state_path = Path(cache_dir) / BATCH_STATE_FILE if cache_dir is not None else None
        self._state: dict[str, Any] = {}
        if self.state_path is not None and self.state_path.exists():
            self._state = json.loads(self.state_path.read_text(encoding="utf-8"))

    def _remember(self, digest: str, entry: dict[str, Any]) -> None:
        self._state[digest] = entry
        if self.state_path is not None:
            atomic_write_json(self.state_path, self._state)

    def _fetch(self, kind: str, items: list[Any], params: list[SamplingParams], on_done: OnDone) -> None:
        left: list[int] = []
        for start in range(0, len(items), MAX_BATCH):
            idx = list(range(start, min(start + MAX_BATCH, len(items))))
            left += [idx[k] for k in self._run(lambda idx=idx: self._one_batch(
                kind, [items[j] for j in idx], [params[j] for j in idx], lambda k, value: on_done(idx[k], value)))]
        if left:  # what the batch could not answer: sent one by one
            print(f"[teacher] {len(left)} request(s) the batch did not answer: sending them directly",
                  file=sys.stderr, flush=True)
            super()._fetch(kind, [items[j] for j in left], [params[j] for j in left],
                           lambda k, value: on_done(left[k], value))

    async def _one_batch(self, kind: str, items: list[Any], params: list[SamplingParams], on_done: OnDone) -> list[int]:
        """Run one batch; return the indices it did not answer."""
        cfg = self.config
        endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        lines = [json.dumps({"custom_id": f"r{k}", "method": "POST", "url": endpoint,
                             "body": _body(kind, cfg.model, item, p)}, ensure_ascii=False, sort_keys=True)
                 for k, (item, p) in enumerate(zip(items, params))]
        data = ("\n".join(lines) + "\n").encode("utf-8")
        digest = hashlib.sha256(data).hexdigest()
        base = self.base_url
        async with httpx.AsyncClient(headers=self._headers(), timeout=cfg.timeout) as client:
            known = self._state.get(digest)
            batch = None
            if known and known.get("base_url") == base:
                batch = await self._call(client, "GET", f"{base}/batches/{known['batch_id']}")
                if batch.get("status") in ("failed", "expired", "cancelled"):
                    batch = None  # start over: nothing of it was answered (expired ones: read what was)
                else:
                    print(f"[teacher] resuming batch {batch['id']} ({batch.get('status')})", file=sys.stderr, flush=True)
            if batch is None:
                if self.state_path is not None:  # kept for inspection and for `openai api` users
                    (self.state_path.parent / f"batch-{digest[:16]}.jsonl").write_bytes(data)
                upload = await self._call(client, "POST", f"{base}/files", data={"purpose": "batch"},
                                          files={"file": (f"batch-{digest[:16]}.jsonl", data, "application/jsonl")})
                batch = await self._call(client, "POST", f"{base}/batches",
                                         json={"input_file_id": upload["id"], "endpoint": endpoint,
                                               "completion_window": cfg.batch_window})
                self._remember(digest, {"batch_id": batch["id"], "base_url": base, "created": time.time(),
                                        "requests": len(items)})
                self.stats["batches"] += 1
                print(f"[teacher] batch {batch['id']}: {len(items)} requests submitted", file=sys.stderr, flush=True)
            last = ""
            while batch.get("status") not in _ENDED:
                counts = batch.get("request_counts") or {}
                line = f"{batch.get('status')} {counts.get('completed', 0)}/{counts.get('total', len(items))}"
                if line != last:
                    print(f"[teacher] batch {batch['id']}: {line}", file=sys.stderr, flush=True)
                    last = line
                await asyncio.sleep(cfg.batch_poll_s)
                batch = await self._call(client, "GET", f"{base}/batches/{batch['id']}")
            answered: set[int] = set()
            if batch.get("output_file_id"):
                text = await self._call(client, "GET", f"{base}/files/{batch['output_file_id']}/content", raw=True)
                # A row that does not parse is left unanswered (asked again), not a crash that loses the rest.
                for _, out in json_lines(f"batch {batch['id']} output", text=text, keep_going=True, allow_nan=True):
                    if not isinstance(out, dict):
                        continue
                    k = int(str(out.get("custom_id", "r-1"))[1:])
                    response = out.get("response") or {}
                    if 0 <= k < len(items) and response.get("status_code") == 200:
                        try:
                            value = _parse(kind, response["body"])
                        except (KeyError, IndexError, TypeError, AttributeError):
                            continue
                        on_done(k, value)
                        answered.add(k)
            if batch.get("status") != "completed":
                print(f"[teacher] batch {batch['id']} ended {batch.get('status')}", file=sys.stderr, flush=True)
        return [k for k in range(len(items)) if k not in answered]

    async def _call(self, client: httpx.AsyncClient, method: str, url: str, raw: bool = False, **kw: Any) -> Any:
        """One Files/Batches API call with the backend's retries for transient failures."""
        cfg = self.config
        last = ""
        for attempt in range(cfg.max_retries + 1):
            response = None
            try:
                response = await client.request(method, url, **kw)
            except httpx.TransportError as err:
                last = f"{type(err).__name__}: {err}"
            else:
                if response.status_code == 200:
                    return response.text if raw else response.json()
                if not retryable(response.status_code):
                    raise TeacherError(f"teacher {self.name}: HTTP {response.status_code} from {url}: "
                                       f"{_server_message(response)} — does this endpoint offer the Batch API? "
                                       "(set `batch: false` to send requests one by one)")
                last = f"HTTP {response.status_code}"
            if attempt < cfg.max_retries:
                self.stats["retries"] += 1
                await asyncio.sleep(self._delay(attempt, None))
        raise TeacherError(f"teacher {self.name}: {method} {url} failed {cfg.max_retries + 1} times ({last})")
