"""Interactive terminal chat: a local model through the engine, or any OpenAI-compatible server.

Who answers is declared as every stage declares it, a `TeacherConfig` (backend `local`: a model loaded
here; `openai`: a server, its key read from `api_key_env`); `backend_for` turns it into a streaming
backend. Teachers answer whole replies for datasets; a chat streams, so the REPL keeps its own two
streaming backends behind that one declaration.

Commands inside the chat: `/system TEXT` sets the system prompt (and starts over), `/reset` forgets
the conversation, `/exit` (or end of input) quits. Replies stream to the terminal as they arrive.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, TextIO

from pydantic import Field

from .config import MaxNewTokens, Sampling as _Sampling, Temperature, TopK
from .errors import UserError

if TYPE_CHECKING:
    from .engine.core import RequestDriver
    from .teachers.base import TeacherConfig

__all__ = ["Sampling", "LocalBackend", "RemoteBackend", "ReplyError", "backend_for", "run_repl", "HELP"]

HELP = "commands: /system TEXT (set the system prompt, starts over), /reset, /exit"


class Sampling(_Sampling):
    """protege's one sampling shape, with a chat's defaults and two extras for both backends: `top_k` (sent
    to servers as an extension field; protege's own server, vLLM and llama.cpp honour it) and `seed`."""

    max_new_tokens: MaxNewTokens = Field(512, description="longest reply in tokens")
    temperature: Temperature = Field(0.7, description="0 = greedy")
    top_k: TopK = Field(0, description="keep the k most likely tokens; 0 = off")
    seed: int | None = Field(None, description="sampling seed")


class ReplyError(UserError):
    """This reply cannot be had (the conversation outgrew the model, the server refused or is gone); the chat
    goes on without the message that asked for it."""


class Backend(Protocol):
    name: str

    def stream(self, messages: list[dict[str, str]], sampling: Sampling) -> Iterator[str]: ...


class LocalBackend:
    """A model loaded in this process; generation through the engine (same tokens as training)."""

    def __init__(self, engine: RequestDriver, name: str):
        self.engine = engine
        self.name = name

    @classmethod
    def load(cls, spec: str, precision: str = "auto") -> "LocalBackend":
        from .engine import engine_for

        return cls(engine_for(str(spec), precision=precision, max_batch=1), str(spec))

    def stream(self, messages: list[dict[str, str]], sampling: Sampling) -> Iterator[str]:
        from .engine import SamplingParams

        ids = self.engine.chat_format.encode_prompt(messages)
        params = SamplingParams.from_config(sampling, sampling.seed, list(self.engine.chat_format.stop_strings))
        try:
            yield from self.engine.stream(ids, params)
        except ValueError as err:  # the engine's own refusal, e.g. a conversation longer than the context
            raise ReplyError(f"{err} (/reset starts over)") from None


class RemoteBackend:
    """Any OpenAI-compatible `/v1/chat/completions` (e.g. `protege serve`), via the official client."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, timeout: float = 120.0):
        from openai import OpenAI

        base = url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        # No retries: a person is waiting, and a retried stream would print its reply twice.
        self.client = OpenAI(base_url=base, api_key=api_key or "none", max_retries=0, timeout=timeout)
        self.name = model or self._first_model()

    def _first_model(self) -> str:
        import openai

        try:
            listed = self.client.models.list().data
        except openai.APIStatusError as err:
            raise ReplyError(f"{self.client.base_url}models answered {err.status_code}: {err.message}") from None
        except openai.APIConnectionError as err:
            raise ReplyError(f"cannot reach {self.client.base_url}: {err}") from None
        if not listed:
            raise ReplyError(f"{self.client.base_url}models lists no model; name one: protege chat MODEL --url URL")
        return listed[0].id

    def stream(self, messages: list[dict[str, str]], sampling: Sampling) -> Iterator[str]:
        import openai

        extra = {"top_k": sampling.top_k} if sampling.top_k else None
        try:
            chunks = self.client.chat.completions.create(
                model=self.name, messages=messages, stream=True, temperature=sampling.temperature,
                top_p=sampling.top_p, max_tokens=sampling.max_new_tokens, seed=sampling.seed, extra_body=extra)
            try:
                for chunk in chunks:
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content
            finally:
                chunks.close()  # Ctrl-C mid-reply: closing the connection makes the server free the slot
        except openai.APIStatusError as err:  # the server's own words (OpenAI-shaped 4xx/5xx)
            raise ReplyError(f"the server answered {err.status_code}: {err.message}") from None
        except openai.APIConnectionError as err:  # refused, reset, timed out
            raise ReplyError(f"no reply from {self.client.base_url}: {err}") from None


def backend_for(teacher: "TeacherConfig") -> Backend:
    """The streaming backend for who answers. `openai` without an explicit `model` asks the server which
    model it serves (the first `/v1/models` lists)."""
    import os

    from .config import ConfigError

    if teacher.backend == "local":
        return LocalBackend.load(teacher.model, teacher.precision)
    if teacher.backend == "openai":
        if not teacher.base_url or isinstance(teacher.base_url, list):
            raise ConfigError("chat: an `openai` answerer needs one base_url (the server to talk to)")
        model = teacher.model if "model" in teacher.model_fields_set else None
        return RemoteBackend(teacher.base_url, os.environ.get(teacher.api_key_env), model, teacher.timeout)
    raise ConfigError(f"chat: the {teacher.backend!r} backend does not stream; serve the model "
                      "(`vllm serve MODEL` or `protege serve MODEL`) and chat with it through its URL")


def run_repl(backend: Backend, sampling: Sampling, system: str | None = None,
             read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> int:
    """Chat until /exit or end of input. `read(prompt)` returns one line (raises EOFError at the end)."""
    history: list[dict[str, str]] = []
    out.write(f"chatting with {backend.name} — {HELP}\n")
    out.flush()
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            out.write("\n")
            return 0
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd in ("/exit", "/quit"):
                return 0
            if cmd == "/reset":
                history = []
                out.write("(conversation reset)\n")
            elif cmd == "/system":
                system = arg.strip() or None
                history = []
                out.write(f"(system prompt {'set' if system else 'cleared'}; conversation reset)\n")
            else:
                out.write(f"unknown command {cmd!r}; {HELP}\n")
            out.flush()
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        reply = ""
        try:
            for delta in backend.stream(messages, sampling):
                reply += delta
                out.write(delta)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        except ReplyError as err:
            history.pop()  # unanswered: asking again (or after /reset) must not send it twice
            lead = "\n" if reply else ""
            out.write(f"{lead}(error: {err}; that message was not kept)\n")
            out.flush()
            continue
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": reply})
