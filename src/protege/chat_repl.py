"""Interactive terminal chat: a local model through the engine, or any OpenAI-compatible server.

Who answers is a `TeacherConfig`, as in every stage (backend `local`: a model loaded here; `openai`: a
server, its key read from `api_key_env`), and the reply comes from that teacher's `stream`: the chat and
the stages that make datasets talk to models through one client.

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
    from .teachers.base import Teacher, TeacherConfig

__all__ = ["Sampling", "TeacherBackend", "ReplyError", "backend_for", "run_repl", "HELP"]

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


class TeacherBackend:
    """A teacher as the chat's backend: its `stream`, with the chat's sampling."""

    def __init__(self, teacher: Teacher, name: str):
        self.teacher = teacher
        self.name = name

    def stream(self, messages: list[dict[str, str]], sampling: Sampling) -> Iterator[str]:
        from .engine import SamplingParams
        from .teachers import TeacherError

        try:
            yield from self.teacher.stream(messages, SamplingParams.from_config(sampling, sampling.seed))
        except TeacherError as err:
            raise ReplyError(str(err)) from None


def backend_for(teacher: "TeacherConfig") -> Backend:
    """The chat backend for who answers. `openai` without an explicit `model` asks the server which model it
    serves (the first `/v1/models` lists); `vllm` (in-process, no streaming) is refused with what to do."""
    from .config import ConfigError
    from .teachers import TeacherError, make_teacher

    if teacher.backend == "vllm":
        raise ConfigError("chat: the vllm backend does not stream; serve the model (`vllm serve MODEL` or "
                          "`protege serve MODEL`) and chat with it through --url")
    if teacher.backend == "openai" and isinstance(teacher.base_url, list):
        raise ConfigError("chat: give one server (base_url), not a list")
    answerer = make_teacher(teacher)  # no cache folder: a chat is not replayed
    if teacher.backend == "openai" and "model" not in teacher.model_fields_set:
        try:
            listed = answerer.served_models()  # type: ignore[attr-defined]
        except TeacherError as err:
            raise ReplyError(str(err)) from None
        if not listed:
            raise ReplyError(f"{answerer.base_url}/models lists no model; name one: protege chat MODEL --url URL")  # type: ignore[attr-defined]
        answerer = make_teacher(teacher.model_copy(update={"model": listed[0]}))
    name = answerer.config.model
    if teacher.backend == "local":
        answerer.engine  # noqa: B018 -- load now, not on the first message (a bad model is an error at start)
    return TeacherBackend(answerer, name)


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
