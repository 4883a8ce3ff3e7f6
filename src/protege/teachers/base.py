"""The teacher protocol and its config: what every backend shares (cache, batching, choice scoring)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence, TypeAlias

from pydantic import Field, field_validator

from ..config import StageConfig
from ..errors import StageError
from ..net import key_env_allowed
from ..precision import PRECISION_HELP, Precision
from .cache import ResponseCache, request_key

if TYPE_CHECKING:
    from ..chat import ChatFormat
    from ..engine.sampling import SamplingParams

# `on_done(index, {"text", "usage", "finish_reason"})`: a backend reports each answer the moment it has it.
OnDone: TypeAlias = Callable[[int, dict[str, Any]], None]

__all__ = ["TeacherConfig", "TeacherResponse", "TeacherError", "Teacher", "sampling_dict"]

CACHE_FILE = "teacher_cache.sqlite"


class TeacherConfig(StageConfig):
    backend: Literal["local", "openai", "vllm"] = Field(
        "local", description="`local` (protege engine), `openai` (any OpenAI-compatible HTTP API) or `vllm` (vLLM's "
        "in-process engine; vLLM must be installed)")
    model: str = Field("smollm2-135m-instruct", description="local: model alias/folder/.gguf; openai: the model name the server expects")
    base_url: str | list[str] | None = Field(None, description="openai backend: API root ending in /v1 (default "
                                             "https://api.openai.com/v1), or a list of endpoints serving the same "
                                             "model (e.g. one vLLM server per GPU): requests are spread across them")
    api_key_env: str = Field("OPENAI_API_KEY", description="name of the environment variable holding the API key (the key itself is never stored)")
    concurrency: int = Field(8, ge=1, description="openai backend: requests in flight at once")
    timeout: float = Field(120.0, gt=0, description="openai backend: seconds before a request is abandoned and retried")
    max_retries: int = Field(6, ge=0, description="openai backend: retries on 429 / 5xx / timeouts / dropped connections")
    backoff_base: float = Field(1.0, ge=0, description="openai backend: first retry waits about this many seconds, doubling each time (with jitter)")
    backoff_max: float = Field(60.0, ge=0, description="openai backend: longest wait between retries unless the server's Retry-After asks for more")
    batch: bool = Field(False, description="openai backend: send the requests through the Batch API (half the price, "
                                           "answers within batch_window; a killed run re-polls its batch)")
    batch_window: str = Field("24h", description="openai backend, batch: the batch's completion_window")
    batch_poll_s: float = Field(30.0, gt=0, description="openai backend, batch: seconds between status checks")
    max_batch_size: int = Field(16, ge=1, description="local and vllm backends: prompts decoded together")
    precision: Precision = Field("auto", description=f"local and vllm backends: {PRECISION_HELP}")

    @field_validator("api_key_env")
    @classmethod
    def _key_env(cls, name: str) -> str:
        if not key_env_allowed(name):
            raise ValueError(f"{name!r}: protege sends only environment variables named *_API_KEY as API keys "
                             "(so a recipe cannot send another secret to a server of its choosing); to use "
                             f"{name}, list it yourself: PROTEGE_KEY_ENVS={name} protege ...")
        return name

    @field_validator("base_url")
    @classmethod
    def _urls(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list):
            if not value or not all(isinstance(u, str) and u.strip() for u in value):
                raise ValueError("a list of endpoints must hold at least one URL, each a non-empty string")
            if len(set(value)) != len(value):
                raise ValueError("the same endpoint is listed twice")
            return value[0] if len(value) == 1 else value
        return value


@dataclass
class TeacherResponse:
    text: str
    usage: dict[str, int] = field(default_factory=dict)
    finish_reason: str = "stop"
    cached: bool = False


class TeacherError(StageError):
    """The teacher cannot answer (bad key, unknown model, retries exhausted); the message says what to fix."""


_SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids", "seed")


def sampling_dict(sampling: SamplingParams) -> dict[str, Any]:
    """The sampling fields that change an answer, as a plain dict (part of the cache key)."""
    out = {name: getattr(sampling, name, None) for name in _SAMPLING_FIELDS}
    out["stop"] = list(out["stop"] or [])
    out["stop_token_ids"] = list(out["stop_token_ids"]) if out["stop_token_ids"] else None
    return out


def prompt_ids(chat_format: ChatFormat, kind: str, items: list[Any]) -> list[list[int]]:
    """Token ids of each request for a model run in this process: a conversation through the model's chat
    format (the ids training saw), a plain completion prompt through its tokenizer (which adds BOS where the
    model expects it)."""
    if kind == "chat":
        return [chat_format.encode_prompt(c) for c in items]
    return [chat_format.tokenizer(text)["input_ids"] for text in items]


class Teacher:
    """Shared logic: cache lookups, de-duplication, stats. Backends implement `_fetch`."""

    backend = "?"

    def __init__(self, config: TeacherConfig, cache_dir: str | Path | None = None):
        self.config = config
        self.cache = ResponseCache(Path(cache_dir) / CACHE_FILE if cache_dir is not None else None)
        # requests: asked for; cache_hits: answered from disk; sent: actually computed / sent to the API.
        self.stats: Counter[str] = Counter()

    @property
    def name(self) -> str:
        return f"{self.backend}:{self.config.model}"

    @property
    def is_chat_model(self) -> bool:
        """Whether prompts should be chat conversations (else plain completion prompts)."""
        return True

    def complete(self, conversations: list[list[dict[str, str]]], sampling: SamplingParams | Sequence[SamplingParams], progress: bool = False) -> list[TeacherResponse]:
        """Answer each conversation's next assistant turn. `sampling`: one SamplingParams or one per conversation."""
        return self._complete("chat", [[dict(m) for m in c] for c in conversations], sampling, progress)

    def _identity(self) -> dict[str, Any]:
        """Who answers, as the cache keys it: a different model (or precision) must not reuse answers."""
        return {"backend": self.backend, "model": self.config.model}

    def stream(self, messages: list[dict[str, str]], sampling: SamplingParams) -> Iterator[str]:
        """The text of one chat reply, piece by piece as it is decoded (for a person reading: not cached). A
        reply that cannot be had is a TeacherError saying why."""
        raise TeacherError(f"teacher {self.name}: the {self.backend} backend does not stream; serve the model "
                           "(`vllm serve MODEL` or `protege serve MODEL`) and use backend openai")

    def complete_prompts(self, prompts: list[str], sampling: SamplingParams | Sequence[SamplingParams], progress: bool = False) -> list[TeacherResponse]:
        """Continue plain text prompts (for base models: the original Self-Instruct setting)."""
        return self._complete("text", list(prompts), sampling, progress)

    def _complete(self, kind: str, items: list[Any], sampling: SamplingParams | Sequence[SamplingParams], progress: bool) -> list[TeacherResponse]:
        params = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(items)
        if len(params) != len(items):
            raise ValueError(f"got {len(params)} sampling params for {len(items)} requests")
        results: list[TeacherResponse | None] = [None] * len(items)
        pending: dict[str, list[int]] = {}  # key -> indices waiting for it (identical requests are sent once)
        for i, (item, p) in enumerate(zip(items, params)):
            key = request_key({**self._identity(), "kind": kind,
                               "input": item, "sampling": sampling_dict(p)})
            self.stats["requests"] += 1
            hit = self.cache.get(key)
            if hit is not None:
                self.stats["cache_hits"] += 1
                results[i] = TeacherResponse(hit["text"], hit.get("usage", {}), hit.get("finish_reason", "stop"), True)
            elif key in pending:
                self.stats["deduplicated"] += 1
                pending[key].append(i)
            else:
                pending[key] = [i]
        keys = list(pending)
        if keys:
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(keys), desc=f"teacher {self.config.model}", unit="req", dynamic_ncols=True, leave=False)

            def on_done(j: int, value: dict[str, Any]) -> None:
                # Cached the moment it arrives: a kill right after this loses nothing.
                self.cache.put(keys[j], value)
                self.stats["sent"] += 1
                for name in ("prompt_tokens", "completion_tokens"):
                    self.stats[name] += int(value.get("usage", {}).get(name, 0) or 0)
                for i in pending[keys[j]]:
                    results[i] = TeacherResponse(value["text"], value.get("usage", {}), value.get("finish_reason", "stop"), False)
                if bar is not None:
                    bar.update(1)

            try:
                first = [pending[k][0] for k in keys]
                self._fetch(kind, [items[i] for i in first], [params[i] for i in first], on_done)
            finally:
                if bar is not None:
                    bar.close()
        missing = sum(r is None for r in results)
        if missing:
            raise TeacherError(f"teacher {self.name}: {missing} request(s) got no answer")
        return results  # type: ignore[return-value]

    def _fetch(self, kind: str, items: list[Any], params: list[SamplingParams], on_done: OnDone) -> None:
        """Compute every request, calling `on_done(index, {"text", "usage", "finish_reason"})` as each finishes."""
        raise NotImplementedError

    @property
    def scores_choices(self) -> bool:
        """Whether `choice_probs` works (a local model: its next-token distribution is readable)."""
        return False

    def choice_probs(self, conversations: list[list[dict[str, str]]], prefix: str, options: list[str],
                     progress: bool = False) -> list[list[float]]:
        """P(option) per conversation, for the assistant reply that begins with `prefix` and continues
        with one of `options` (log P of the option's tokens), normalised over the options.

        One forward pass per conversation instead of generating text: never unparseable, a probability
        per verdict. Cached like completions, so a killed judge run resumes where it stopped.
        """
        results: list[list[float] | None] = [None] * len(conversations)
        todo: dict[str, list[int]] = {}
        for i, conv in enumerate(conversations):
            key = request_key({**self._identity(), "kind": "choice",
                               "input": conv, "prefix": prefix, "options": list(options)})
            self.stats["requests"] += 1
            hit = self.cache.get(key)
            if hit is not None:
                self.stats["cache_hits"] += 1
                results[i] = hit["probs"]
            else:
                todo.setdefault(key, []).append(i)
        if todo:
            keys = list(todo)
            firsts = [conversations[todo[k][0]] for k in keys]
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(keys), desc=f"judge {self.config.model} (log-probs)", unit="verdict",
                           dynamic_ncols=True, leave=False)
            for j, logps in self._choice_logprobs(firsts, prefix, list(options)):
                probs = _normalise(logps)
                self.cache.put(keys[j], {"probs": probs, "logprobs": logps})
                self.stats["sent"] += 1
                for i in todo[keys[j]]:
                    results[i] = probs
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]

    def _choice_logprobs(self, conversations: list[list[dict[str, str]]], prefix: str,
                         options: list[str]) -> Any:
        """Yield (index, [log P(first token of option) for each option]) as each conversation is scored."""
        raise TeacherError(f"teacher {self.name}: the {self.backend} backend cannot read next-token "
                           "probabilities; use generated verdicts (`verdicts: generate`)")

    def close(self) -> None:
        self.cache.close()


def _normalise(logps: list[float]) -> list[float]:
    import math

    top = max(logps)
    exps = [math.exp(v - top) for v in logps]
    total = sum(exps)
    return [x / total for x in exps]
