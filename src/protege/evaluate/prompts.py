"""Benchmark prompts: plain text for base models, the model's chat format for chat models.

Plain (lm-eval style, k-shot):
    [instruction]\n\n shot_1 + " " + answer_1 \n\n ... \n\n template(item)        -> continuation " " + option
Chat:
    [system: instruction] user: shot_1 / assistant: answer_1 ... user: template(item) -> assistant turn
    rendered with the generation prompt; options are scored as the start of the assistant's answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..chat import ChatFormat
from ..engine.loglik import tok_encode
from ..tasks.spec import LETTERS, TaskSpec, format_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["PromptBuilder", "gold_text"]


def gold_text(spec: TaskSpec, item: dict[str, Any]) -> str:
    """The answer a solved shot shows, in the form the model is expected to produce."""
    if spec.type == "multiple_choice":
        return LETTERS[item["gold"]] if spec.choices == "letters" else str(item["choices"][item["gold"]])
    if spec.type == "generate":
        ans = item["answer"]
        return str(ans[0] if isinstance(ans, list) else ans)
    if spec.type == "classify":
        return str(item["label"])
    return str(item["sql"]).strip().rstrip(";") + ";"


@dataclass
class PromptBuilder:
    """Builds the prompt of every item of one task; `chat` is None for plain prompting."""

    spec: TaskSpec
    shots: list[dict[str, Any]]
    chat: ChatFormat | None = None
    extra: dict[str, Any] | None = None  # task-level template fields (e.g. {schema} for sql)

    def _fields(self, item: dict[str, Any]) -> dict[str, Any]:
        labels = ", ".join(self.spec.labels)
        return {**(self.extra or {}), "labels": labels, **item}

    def _user(self, item: dict[str, Any]) -> str:
        tpl = self.spec.chat_template if (self.chat and self.spec.chat_template) else self.spec.item_template
        return format_template(tpl, self._fields(item), self.spec.name)

    @property
    def instruction(self) -> str:
        """The task instruction, with task-level fields filled in (the SQL schema)."""
        return format_template(self.spec.instruction, self.extra or {}, self.spec.name)

    def messages(self, item: dict[str, Any]) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.instruction}] if self.spec.instruction else []
        for shot in self.shots:
            msgs += [{"role": "user", "content": self._user(shot)},
                     {"role": "assistant", "content": gold_text(self.spec, shot)}]
        return msgs + [{"role": "user", "content": self._user(item)}]

    def context(self, item: dict[str, Any]) -> str:
        """The text everything is conditioned on (the chat rendering ends with the assistant header)."""
        if self.chat is not None:
            return self.chat.render(self.messages(item), add_generation_prompt=True)
        s = self.spec
        parts = [self.instruction] if s.instruction else []
        parts += [self._user(shot) + s.target_delimiter + gold_text(s, shot) for shot in self.shots]
        parts.append(self._user(item))
        return s.fewshot_delimiter.join(parts)

    def options(self, item: dict[str, Any]) -> tuple[list[str], list[str]]:
        """(continuations to score, option texts for length normalisation), lm-eval style."""
        choices = [LETTERS[i] for i in range(len(item["choices"]))] if self.spec.choices == "letters" \
            else [str(c) for c in item["choices"]]
        delim = "" if self.chat is not None else self.spec.target_delimiter
        return [delim + c for c in choices], choices

    def generation_ids(self, item: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> list[int]:
        if self.chat is not None:
            return self.chat.encode_prompt(self.messages(item))
        return tok_encode(tokenizer, self.context(item))

    @property
    def stop(self) -> list[str]:
        return list(self.spec.chat_stop if self.chat is not None else self.spec.stop)
