"""Interactive terminal chat: a local model through the engine, or any OpenAI-compatible server.

Commands inside the chat: `/system TEXT` sets the system prompt (and starts over), `/reset` forgets
the conversation, `/exit` (or end of input) quits. Replies stream to the terminal as they arrive.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, TextIO

from pydantic import Field

from .config import MaxNewTokens, Sampling as _Sampling, Temperature, TopK

if TYPE_CHECKING:
    from .engine.core import RequestDriver

__all__ = ["Sampling", "LocalBackend", "RemoteBackend", "run_repl", "HELP"]

HELP = "commands: /system TEXT (set the system prompt, starts over), /reset, /exit"


class Sampling(_Sampling):
    """protege's one sampling shape, with a chat's defaults and two extras for both backends: `top_k` (sent
    to servers as an extension field; protege's own server, vLLM and llama.cpp honour it) and `seed`."""

    max_new_tokens: MaxNewTokens = Field(512, description="longest reply in tokens")
    temperature: Temperature = Field(0.7, description="0 = greedy")
    top_k: TopK = Field(0, description="keep the k most likely tokens; 0 = off")
    seed: int | None = Field(None, description="sampling seed")


class Backend(Protocol):
    name: str

    def stream(self, messages: list[dict[str, str]], sampling: Sampling) -> Iterator[str]: ...


class LocalBackend:
    """A model loaded in this process; generation through the engine (same tokens as training)."""

    def __init__(self, engine: RequestDriver, name: str):
        self.engine = engine
        self.name = name

    @classmethod
    def load(cls, spec: str) -> "LocalBackend":
        from .engine import engine_for

        return cls(engine_for(str(spec)), str(spec))

    def stream(self, messages: list[dict[str, str]], sampling: Sampling) -> Iterator[str]:
        from .engine import SamplingParams

        ids = self.engine.chat_format.encode_prompt(messages)
        params = SamplingParams.from_config(sampling, sampling.seed, list(self.engine.chat_format.stop_strings))
        yield from self.engine.stream(ids, params)


class RemoteBackend:
    """Any OpenAI-compatible `/v1/chat/completions` (e.g. `protege serve`), via the official client."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None):
        from openai import OpenAI

        base = url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        self.client = OpenAI(base_url=base, api_key=api_key or "none", max_retries=0)
        self.name = model or self.client.models.list().data[0].id

    def stream(self, messages: list[dict[str, str]], sampling: Sampling) -> Iterator[str]:
        extra = {"top_k": sampling.top_k} if sampling.top_k else None
        chunks = self.client.chat.completions.create(
            model=self.name, messages=messages, stream=True, temperature=sampling.temperature,
            top_p=sampling.top_p, max_tokens=sampling.max_new_tokens, seed=sampling.seed, extra_body=extra)
        try:
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        finally:
            chunks.close()  # Ctrl-C mid-reply: closing the connection makes the server free the slot


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
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": reply})
