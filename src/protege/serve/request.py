"""The request side of the OpenAI-compatible API: the schema of `/v1/chat/completions` bodies, the
checks that turn a bad one into a 400 naming its parameter (as `guard.APIError`, OpenAI's error shape)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import Temperature, TopK, TopP
from .guard import APIError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["APIError", "ChatCompletionRequest", "Message", "ROLES", "MAX_N", "MAX_STOP", "INT64",
           "validation_error", "message_text", "unicode_text", "refuse_unsupported", "max_token_chars",
           "engine_context_length", "refuse_too_many_messages", "SLOW_REFUSALS", "response_schema", "request_messages"]

ROLES = ("system", "user", "assistant")
MAX_N = 16
MAX_STOP = 16
MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs
INT64 = 1 << 63  # OpenAI's seed is an int64; a bigger one is a 400, not an overflow deep in torch


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # "3" is not 3, "yes" is not true (OpenAI: 400)
    include_usage: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's request we honour; a required tool call is refused with a 400
    (`refuse_unsupported`); other OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    messages: list[Message]
    # The sampling bounds every protege config declares (config.Temperature, TopP, TopK), with OpenAI's own
    # ceiling on temperature; a value outside them is a 400 naming the parameter (`validation_error`).
    temperature: Annotated[Temperature, Field(le=2.0)] = Field(1.0, description="0 = greedy; OpenAI's range 0..2")
    top_p: TopP = 1.0
    top_k: TopK = Field(0, description="extension (vLLM/llama.cpp): keep the k most likely tokens; 0 = off")
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # Read only to refuse it: answering 200 without the tool call that was required would hand a client a
    # result it did not ask for.
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if part == "body":
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_error(err: ValidationError | RequestValidationError) -> APIError:
    first = err.errors()[0]
    param = _loc(tuple(first.get("loc", ())))
    given = first.get("input")
    got = f" (got {json.dumps(given)[:80]})" if isinstance(given, (int, float, str)) and param else ""
    return APIError(400, f"invalid request: {param}: {first.get('msg')}{got}", param=param or None)


def refuse_unsupported(req: ChatCompletionRequest) -> None:
    """400 for the OpenAI options this server cannot honour (see ChatCompletionRequest)."""
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"top_logprobs is {req.top_logprobs}; expected 0..{MAX_LOGPROBS}", param="top_logprobs")
    if req.tool_choice == "required" or isinstance(req.tool_choice, dict):
        raise APIError(400, "tool_choice requires a tool call, and this server does not call tools; use "
                            "tool_choice \"none\" or \"auto\" (answers are plain text)", param="tool_choice")
    response_schema(req)  # a malformed response_format is a 400 here


def response_schema(req: ChatCompletionRequest) -> str | None:
    """The JSON schema `response_format` asks for (json_object: any object), or None for free text."""
    fmt = req.response_format or {}
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return '{"type": "object"}'
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "response_format json_schema needs json_schema.schema, a JSON schema object",
                           param="response_format.json_schema.schema")
        import json

        return json.dumps(schema)
    raise APIError(400, f"response_format type {kind!r} is not one of text, json_object, json_schema",
                   param="response_format")


def request_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """The request's messages as protege's {"role", "content"} dicts: "developer" (newer OpenAI clients) is
    "system", content parts are joined; any other role is a 400 naming the message."""
    messages = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role is {m.role!r}; expected one of {', '.join(ROLES)}",
                           param=f"messages[{i}].role")
        messages.append({"role": role, "content": message_text(m, i)})
    return messages


def message_text(msg: Message, i: int) -> str:
    """OpenAI content is a string or a list of parts; we take the text parts (no images here)."""
    if msg.content is None:
        return ""
    if isinstance(msg.content, str):
        return unicode_text(msg.content, f"messages[{i}].content")
    texts = []
    for part in msg.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"messages[{i}].content: only text parts are supported, got type "
                                f"{part.get('type')!r}", param=f"messages[{i}].content")
        texts.append(part["text"])
    return unicode_text("".join(texts), f"messages[{i}].content")


def unicode_text(text: str, param: str) -> str:
    """JSON can carry a lone surrogate (`"\\ud800"`) that no tokenizer can encode: a 400, not a 500."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise APIError(400, f"{param}: invalid Unicode at character {err.start} (a lone surrogate "
                            f"{text[err.start]!r}); send well-formed UTF-8 text", param=param) from None
    return text


def max_token_chars(tokenizer: PreTrainedTokenizerBase) -> int:
    """The longest token's text: no prompt of c characters can be fewer than c / this many tokens."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 — an unusual tokenizer: no pre-check, tokenisation decides
        return 0
    return max((len(t) for t in vocab), default=0)


def engine_context_length(engine: Any) -> int:
    """The longest prompt + answer the engine takes: its own limit, else the model config's, else 4096."""
    for obj, attr in ((engine, "max_positions"), (getattr(engine, "model", None), "config")):
        value = getattr(obj, attr, None) if obj is not None else None
        if isinstance(value, int):
            return value
        if value is not None and isinstance(getattr(value, "max_position_embeddings", None), int):
            return value.max_position_embeddings
    return 4096


# Refusals that cost real work (read, parse, count, tokenise): answered after a pause (see api.py).
SLOW_REFUSALS = frozenset({"too_many_messages", "context_length_exceeded"})


def refuse_too_many_messages(n: int, limit: int) -> None:
    if n > limit:
        raise APIError(400, f"messages has {n:,} entries; this server takes at most {limit:,} per request "
                            "(--max-messages)", param="messages", code="too_many_messages")
