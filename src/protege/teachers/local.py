"""`local` teacher backend: protege's batched engine on any model spec (alias, HF folder, .gguf).

The model is loaded on the first cache miss, so a fully cached rerun of a killed
generator replays in seconds. Requests go through the engine's continuous batching
(`add_request` / `step`, up to `max_batch_size` rows at once) and each completion is
cached the step it finishes: on a CPU generation is the slow part, and a kill loses
only the requests still being decoded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from .base import Teacher, TeacherError, prompt_ids

if TYPE_CHECKING:
    from ..engine.sampling import SamplingParams
    from .base import OnDone

__all__ = ["LocalTeacher"]


class LocalTeacher(Teacher):
    backend = "local"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._engine: Any = None
        self._is_chat: bool | None = None

    @property
    def engine(self) -> Any:
        if self._engine is None:
            from ..engine import engine_for

            # A .gguf runs in llama.cpp when it is installed (teacher, judge and `eval answer` alike).
            self._engine = engine_for(self.config.model, precision=self.config.precision,
                                      max_batch=self.config.max_batch_size)
        return self._engine

    def stream(self, messages: list[dict[str, str]], sampling: SamplingParams) -> Iterator[str]:
        eng = self.engine  # its chat format's stop strings and ids apply to every request (`request_stops`)
        try:
            yield from eng.stream(prompt_ids(eng.chat_format, "chat", [messages])[0], sampling)
        except ValueError as err:  # the engine's own refusal, e.g. a conversation longer than the context
            raise TeacherError(f"teacher {self.name}: {err}") from None

    def _identity(self) -> dict[str, Any]:
        from ..models import ALIASES
        from ..precision import resolve_precision

        spec = self.config.model
        gguf = str(spec).endswith(".gguf") or (spec in ALIASES and not ALIASES[spec].convert)
        tag = [] if gguf else resolve_precision(self.config.precision).cache_tag  # llama.cpp: the file's own
        return super()._identity() | ({"precision": tag[0]} if tag else {})

    @property
    def is_chat_model(self) -> bool:
        """A model whose tokenizer ships a chat template is chat-tuned; a base model gets completion prompts."""
        if self._is_chat is None:
            from ..models import load_tokenizer

            tok = self._engine.tokenizer if self._engine is not None else load_tokenizer(self.config.model)
            self._is_chat = bool(getattr(tok, "chat_template", None))
        return self._is_chat

    def _fetch(self, kind: str, items: list[Any], params: list[SamplingParams], on_done: OnDone) -> None:
        eng = self.engine
        prompts = prompt_ids(eng.chat_format, kind, items)
        index = {eng.add_request(ids, p): j for j, (ids, p) in enumerate(zip(prompts, params))}
        try:
            while eng.has_pending():
                for out in eng.step():
                    c = out.finished
                    if c is not None and out.request_id in index:
                        on_done(index.pop(out.request_id), {
                            "text": c.text, "finish_reason": c.finish_reason,
                            "usage": {"prompt_tokens": int(c.prompt_tokens), "completion_tokens": int(c.completion_tokens)}})
        finally:
            for rid in list(index):  # interrupted: leave the engine idle for the next call
                eng.cancel(rid)

    @property
    def scores_choices(self) -> bool:
        return True

    def _choice_logprobs(self, conversations: list[list[dict[str, str]]], prefix: str, options: list[str]) -> Any:
        from ..engine.choices import option_token_ids

        eng = self.engine
        prefix_ids = eng.tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
        seqs = option_token_ids(eng.tokenizer, prefix, options)
        prompts = [eng.chat_format.encode_prompt(c) + prefix_ids for c in conversations]
        yield from eng.option_logprobs(prompts, seqs)
