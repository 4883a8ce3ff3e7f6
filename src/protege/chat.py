"""ChatFormat: messages -> token ids + assistant_mask, generation prompts, stop tokens.

One `ChatFormat` per model. Training (`encode`) and inference (`encode_prompt`)
tokenize the rendered template *segment by segment* at the same message
boundaries, so the ids a server feeds for a history are exactly the prefix of the
ids training saw for that history plus the answer. That invariant is tested for
every built-in template.

Template choice, in order:
1. the tokenizer's own `chat_template` (rendered in a Jinja sandbox: templates
   shipped in model files are untrusted code; a render is also bounded in time and
   in what it may build, see `jinja_sandbox.py`);
2. `GEMMA_TEMPLATE` when the vocabulary has `<start_of_turn>`/`<end_of_turn>`
   (Gemma base models ship without a template but with these tokens);
3. `CHATML_TEMPLATE` when it has `<|im_start|>`/`<|im_end|>`;
4. `PLAIN_TEMPLATE`: "### User:" / "### Assistant:" blocks, each answer closed by EOS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from jinja2.exceptions import TemplateError

from .errors import UserError
from .jinja_sandbox import compile_template, render_bounded

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["ChatFormat", "Encoded", "ChatTemplateError", "GEMMA_TEMPLATE", "CHATML_TEMPLATE", "PLAIN_TEMPLATE",
           "mark_prompt", "CHAT_META_FILE", "write_chat_meta"]

# Beside a model's weights: what protege adds to every inference prompt of that model (Koala's conditioning
# marker), so `serve`, `eval answer`, `chat` and local teachers prompt it the way it was trained.
CHAT_META_FILE = "protege_chat.json"

SEGMENTED_PROMPT_MESSAGES = 64  # see ChatFormat.encode_prompt

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% set loop_messages = messages %}{% set first_user_prefix = '' %}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ (first_user_prefix if loop.first else '') + message['content'] }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PLAIN_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    "{% else %}### Assistant:\n{{ message['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)

# End-of-turn markers of common templates, most specific first.
_EOT_CANDIDATES = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>")


class ChatTemplateError(UserError, ValueError):
    """The template cannot render these messages, or is unusable for training."""


@dataclass
class Encoded:
    input_ids: list[int]
    assistant_mask: list[int]  # 1 on tokens the model must learn: assistant content + its end-of-turn token


def _vocab_has(tokenizer: PreTrainedTokenizerBase, *tokens: str) -> bool:
    unk = getattr(tokenizer, "unk_token_id", None)
    for t in tokens:
        tid = tokenizer.convert_tokens_to_ids(t)
        if tid is None or (unk is not None and tid == unk and t != tokenizer.unk_token):
            return False
    return True


def mark_prompt(prompt: list[dict[str, str]], marker: str, placement: str) -> list[dict[str, str]]:
    """The prompt with `marker` in the system message (prepended) or appended to the last user turn."""
    msgs = [dict(m) for m in prompt]
    if placement == "system":
        if msgs and msgs[0]["role"] == "system":
            msgs[0]["content"] = f"{marker}\n{msgs[0]['content']}"
        else:
            msgs.insert(0, {"role": "system", "content": marker})
    else:
        last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        msgs[last]["content"] = f"{msgs[last]['content']}\n\n{marker}"
    return msgs


def write_chat_meta(folder: str | Path, marker: dict[str, str] | None) -> None:
    """Record the inference marker (`{"positive", "placement"}`) beside a saved model; nothing when None."""
    if marker:
        (Path(folder) / CHAT_META_FILE).write_text(json.dumps({"marker": marker}, indent=2) + "\n")


def _read_chat_meta(tokenizer: PreTrainedTokenizerBase) -> dict[str, str] | None:
    path = Path(str(getattr(tokenizer, "name_or_path", "") or "")) / CHAT_META_FILE
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text()).get("marker")
    except (ValueError, AttributeError) as err:
        raise ChatTemplateError(f"{path}: not a JSON object ({err})") from None
    if not (isinstance(marker, dict) and isinstance(marker.get("positive"), str)
            and marker.get("placement") in ("system", "user_suffix")):
        raise ChatTemplateError(f"{path}: expected {{\"marker\": {{\"positive\": str, \"placement\": "
                                "\"system\" | \"user_suffix\"}}}}")
    return marker


class ChatFormat:
    """How one model turns a conversation into tokens (see module docstring).

    `marker` (Koala-style conditioning, read from `protege_chat.json` beside the model): the positive marker
    the model was trained under, put into every inference prompt by `encode_prompt`; training data carries
    its markers itself."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str, name: str = "custom", stop_strings: tuple[str, ...] = (),
                 marker: dict[str, str] | None = None):
        self.tokenizer = tokenizer
        self.template = template
        self.name = name
        self.marker = marker
        self._compiled = compile_template(template)
        self.stop_token_ids = self._find_stop_ids()
        self.stop_strings = stop_strings

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, template: str | None = None) -> "ChatFormat":
        fmt = cls._from_tokenizer(tokenizer, template)
        fmt.marker = _read_chat_meta(tokenizer)
        return fmt

    @classmethod
    def _from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, template: str | None = None) -> "ChatFormat":
        if template:
            return cls(tokenizer, template, "custom")
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # some tokenizers carry several named templates
            own = own.get("default") or next(iter(own.values()), None)
        if own:
            return cls(tokenizer, own, "tokenizer")
        if _vocab_has(tokenizer, "<start_of_turn>", "<end_of_turn>"):
            return cls(tokenizer, GEMMA_TEMPLATE, "gemma")
        if _vocab_has(tokenizer, "<|im_start|>", "<|im_end|>"):
            return cls(tokenizer, CHATML_TEMPLATE, "chatml")
        return cls(tokenizer, PLAIN_TEMPLATE, "plain", stop_strings=("\n### User:",))

    # ---- rendering -------------------------------------------------------------------------

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        tok = self.tokenizer
        try:
            return render_bounded(self._compiled, messages=messages, add_generation_prompt=add_generation_prompt,
                                  bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
        except TemplateError as err:
            raise ChatTemplateError(f"chat template ({self.name}) refused these messages: {err}") from None

    def _find_stop_ids(self) -> list[int]:
        """End-of-turn ids: EOT markers that the template actually emits after an answer, plus EOS."""
        ids: list[int] = []
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ANSWER"}]
        try:
            after = self.render(probe).split("ANSWER", 1)[-1]
        except ChatTemplateError:
            after = ""
        for marker in _EOT_CANDIDATES:
            if marker in after and _vocab_has(self.tokenizer, marker):
                ids.append(self.tokenizer.convert_tokens_to_ids(marker))
        eos = self.tokenizer.eos_token_id
        for e in eos if isinstance(eos, list) else [eos]:
            if e is not None and e not in ids:
                ids.append(e)
        return ids

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _segments(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        """Split the full rendering at message boundaries: [(text, is_assistant_answer)].

        Requires the template to be prefix-stable (rendering the first k messages is a
        prefix of rendering all of them), which holds for every mainstream template.
        """
        full = self.render(messages, add_generation_prompt)
        segments: list[tuple[str, bool]] = []
        pos = 0

        def cut(upto: str, what: str) -> str:
            nonlocal pos
            if not full.startswith(upto) or len(upto) < pos:
                raise ChatTemplateError(
                    f"chat template ({self.name}) is not prefix-stable at {what}: rendering fewer messages "
                    "is not a prefix of rendering them all, so training and inference tokens would differ")
            piece = full[pos:len(upto)]
            pos = len(upto)
            return piece

        for i, msg in enumerate(messages):
            if msg["role"] == "assistant":
                segments.append((cut(self.render(messages[:i], add_generation_prompt=True), f"message {i}"), False))
                segments.append((cut(self.render(messages[: i + 1]), f"message {i}"), True))
            elif i + 1 < len(messages):
                segments.append((cut(self.render(messages[: i + 1]), f"message {i}"), False))
        segments.append((full[pos:], False))
        return segments

    # ---- encoding --------------------------------------------------------------------------

    def encode(self, messages: list[dict[str, str]], train_on_all: bool = False) -> Encoded:
        """Training ids and `assistant_mask` for a conversation (every assistant turn counts)."""
        ids: list[int] = []
        mask: list[int] = []
        stop = set(self.stop_token_ids)
        for text, is_answer in self._segments(messages, add_generation_prompt=False):
            seg = self._tokenize(text)
            if is_answer:
                # Learn the content and its end-of-turn token, not the newline the template puts after it.
                last_stop = max((j for j, t in enumerate(seg) if t in stop), default=len(seg) - 1)
                seg_mask = [1] * (last_stop + 1) + [0] * (len(seg) - last_stop - 1)
            else:
                seg_mask = [0] * len(seg)
            ids.extend(seg)
            mask.extend(seg_mask)
        if train_on_all:
            mask = [1] * len(ids)
        return Encoded(ids, mask)

    def encode_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Ids a server feeds to get the next assistant turn for this history.

        Up to `SEGMENTED_PROMPT_MESSAGES` messages are tokenised message by message, exactly as training
        tokenises them; splitting renders every prefix of the history, which is quadratic in its length
        (5,001 one-character messages took ~40 s). A longer history is rendered and tokenised once, as
        vLLM does: the same ids wherever a message ends in a special token (every mainstream template)."""
        if messages and messages[-1]["role"] == "assistant":
            raise ChatTemplateError("the history ends with an assistant message; nothing to answer")
        if self.marker and messages and not any(self.marker["positive"] in m["content"] for m in messages):
            messages = mark_prompt(messages, self.marker["positive"], self.marker["placement"])
        if len(messages) > SEGMENTED_PROMPT_MESSAGES:
            return self._tokenize(self.render(messages, add_generation_prompt=True))
        ids: list[int] = []
        for text, _ in self._segments(messages, add_generation_prompt=True):
            ids.extend(self._tokenize(text))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Answer text: special tokens and any stop string tail removed."""
        text = self.tokenizer.decode([i for i in ids if i not in set(self.stop_token_ids)], skip_special_tokens=True)
        for s in self.stop_strings:
            text = text.split(s, 1)[0]
        return text

    def apply_to(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Store this template on a tokenizer so `save_pretrained` exports it (tokenizer_config / GGUF)."""
        tokenizer.chat_template = self.template
