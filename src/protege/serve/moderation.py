"""`protege serve --moderation`: check what comes in and what goes out, as Koala's public demo did.

Two moderators, one contract (`check(context, text) -> Verdict`, blocking; the server calls it off the
event loop):

- `RewardModerator`: a reward model folder written by `protege train rm` (e.g. trained on Anthropic HH
  *harmless* pairs). It scores `text` as an assistant turn after `context`, the way it was trained, and
  flags a reward below `threshold`. A text with no user turn before it (the input check, `/v1/moderations`)
  is scored as the assistant's reply to "repeat this message": a request the model would be ashamed to have
  said itself scores low (and chat templates render only conversations that open with a user turn).
  `category_scores["unsafe"]` is sigmoid(threshold - reward): 0.5 at the threshold.
- `EndpointModerator`: any OpenAI-compatible `/v1/moderations` URL (OpenAI's, or another `protege serve`
  with a reward model, which answers that route). It flags what the endpoint flags, or, with a
  threshold, any category score at or above it.

Decisions are logged (request id, stage, flagged, score, latency) without the text unless the operator
asks for it; a moderator that fails closes the request (503), it does not wave it through.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import StageError

__all__ = ["Verdict", "RewardModerator", "EndpointModerator", "ModerationLog", "Moderation", "make_moderator"]

log = logging.getLogger("protege.moderation")


@dataclass
class Verdict:
    flagged: bool
    score: float  # the moderator's own number: a reward, or the highest category score
    category_scores: dict[str, float] = field(default_factory=dict)

    def result(self) -> dict[str, Any]:
        """One entry of OpenAI's moderation `results`."""
        return {"flagged": self.flagged, "categories": {k: self.flagged and v >= 0.5 for k, v in self.category_scores.items()},
                "category_scores": self.category_scores}


_ECHO = "Repeat the following message word for word."


class RewardModerator:
    def __init__(self, path: str, threshold: float = 0.0, max_length: int = 1024):
        from ..chat import ChatFormat
        from ..train.rm import load_reward_model

        self.model, tok = load_reward_model(path)
        self.chat = ChatFormat.from_tokenizer(tok)
        self.threshold, self.max_length = float(threshold), max_length
        self._lock = threading.Lock()  # one forward at a time: the model is shared by the server's threads
        self.name = Path(path).name

    def check(self, context: list[dict[str, str]], text: str) -> Verdict:
        from ..train.rm import score

        if not context or context[-1]["role"] != "user":
            context = [*context, {"role": "user", "content": _ECHO}]
        with self._lock:
            reward = score(self.model, self.chat, [context], [text], batch_size=1, max_length=self.max_length)[0]
        unsafe = 1.0 / (1.0 + math.exp(max(-60.0, min(60.0, reward - self.threshold))))
        return Verdict(reward < self.threshold, reward, {"unsafe": unsafe})


class EndpointModerator:
    def __init__(self, url: str, threshold: float | None = None, api_key: str | None = None, model: str | None = None,
                 timeout_s: float = 30.0):
        self.url, self.threshold, self.model, self.timeout_s = url, threshold, model, timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.name = url

    def check(self, context: list[dict[str, str]], text: str) -> Verdict:
        import httpx

        body: dict[str, Any] = {"input": text}
        if self.model:
            body["model"] = self.model
        r = httpx.post(self.url, json=body, headers=self.headers, timeout=self.timeout_s)
        r.raise_for_status()
        result = r.json()["results"][0]
        scores = {str(k): float(v) for k, v in (result.get("category_scores") or {}).items()}
        top = max(scores.values(), default=0.0)
        flagged = bool(result.get("flagged")) if self.threshold is None else top >= self.threshold
        return Verdict(flagged, top, scores)


class ModerationLog:
    """Every decision as one JSON line (and on the `protege.moderation` logger); the text only if asked."""

    def __init__(self, path: str | None = None, with_text: bool = False):
        self.path, self.with_text = path, with_text
        self._lock = threading.Lock()

    def record(self, request_id: str, stage: str, verdict: Verdict, seconds: float, text: str) -> None:
        entry: dict[str, Any] = {"time": round(time.time(), 3), "request": request_id, "stage": stage,
                                 "flagged": verdict.flagged, "score": round(verdict.score, 6),
                                 "seconds": round(seconds, 4)}
        if self.with_text:
            entry["text"] = text
        log.info("moderation %s", json.dumps(entry, ensure_ascii=False))
        if self.path:
            with self._lock, open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")


class Moderation:
    """What the server holds: the moderator, where decisions go, which stages are checked, and how much
    streamed text is held back per check (`window` characters: text reaches the client only after the
    moderator has passed it, so a flagged answer is cut before its flagged part is sent)."""

    def __init__(self, moderator: Any, log: ModerationLog | None = None, stages: tuple[str, ...] = ("input", "output"),
                 window: int = 200):
        from concurrent.futures import ThreadPoolExecutor

        unknown = set(stages) - {"input", "output"}
        if unknown or not stages:
            raise StageError(f"moderation stages are `input` and/or `output`, got {', '.join(stages) or 'none'}")
        self.moderator, self.log, self.stages, self.window = moderator, log or ModerationLog(), tuple(stages), window
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="protege-moderation")

    async def check(self, stage: str, request_id: str, context: list[dict[str, str]], text: str) -> Verdict:
        """The verdict on `text` (off the event loop); a moderator that fails is a 503, never a pass."""
        import asyncio

        from .guard import APIError

        t0 = time.perf_counter()
        try:
            verdict = await asyncio.get_running_loop().run_in_executor(self.pool, self.moderator.check, context, text)
        except Exception as err:  # noqa: BLE001 — fail closed, and say why
            log.error("moderation failed (%s): %s", self.moderator.name, err)
            raise APIError(503, f"moderation is unavailable ({type(err).__name__}: {err}); the request was not "
                                "answered", type="server_error", code="moderation_unavailable") from None
        self.log.record(request_id, stage, verdict, time.perf_counter() - t0, text)
        return verdict


def make_moderator(spec: str, threshold: float | None = None, api_key: str | None = None) -> Any:
    """A moderator for `--moderation SPEC`: an http(s) URL of a moderation endpoint, or a reward model folder
    (the `train rm` run folder or its `model/` subfolder)."""
    if spec.startswith(("http://", "https://")):
        return EndpointModerator(spec, threshold, api_key)
    path = Path(spec)
    if path.is_dir() and not (path / "config.json").exists() and (path / "model" / "config.json").exists():
        path = path / "model"
    if not (path / "config.json").exists():
        raise StageError(f"--moderation {spec}: expected a reward model folder (written by `protege train rm`) or "
                         "the URL of an OpenAI-compatible /v1/moderations endpoint")
    return RewardModerator(str(path), 0.0 if threshold is None else threshold)
