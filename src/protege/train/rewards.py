"""Rewards for RL and rejection sampling, declared in config: a reward model or a verifiable rule.

A reward maps (prompt item, answer text, answer token count, finish reason) to a float. Rules:

- `contains_gold`: 1 when the item's gold answer appears in the answer (numbers compared as
  numbers, so "1,200" and "1200.0" match "1200"; text as a whole-word, case-insensitive match).
- `final_number`: 1 when the answer's *last* number equals the gold number (GSM8K-style grading;
  stricter than `contains_gold`, which an answer listing many numbers can game -- a good gold scorer
  for an RL run whose proxy is `contains_gold`).
- `ends_within`: 1 when the answer ended its turn (a stop token, not the length limit) within
  `max_tokens` tokens.
- `format`: 1 when the answer matches the regular expression `pattern` (Python `re.search`).
- `length`: min(characters / `length_chars`, 1). Deliberately gameable -- it is the flawed proxy
  the over-optimisation check is tested with, never a goal in itself.

`rm`: the score of a reward model from `train rm` (read at the last token, as in training);
`llama2`: LLaMA-2-Chat's combination of a helpfulness and a safety reward model (`rm.llama2_reward`).

A reward may also be a list of these, each with a `weight`: the reward is their weighted sum (TRL's
`reward_funcs` with `reward_weights`), e.g. correctness plus a smaller bonus for ending the turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field, model_validator

from ..config import StageConfig
from ..errors import StageError

__all__ = ["PromptItem", "RewardConfig", "RewardSpec", "Reward", "make_reward", "describe_reward", "load_prompt_items",
           "contains_gold", "final_number", "matches_gold", "ends_within", "GOLD_RULES"]

GOLD_RULES = ("contains_gold", "final_number")  # rules that read the prompt's gold answer (`matches_gold`)


@dataclass
class PromptItem:
    id: str
    messages: list[dict[str, str]]  # the conversation up to the user's turn
    gold: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class RewardConfig(StageConfig):
    kind: Literal["rule", "rm", "llama2"] = Field("rule", description="rule, a reward model (rm) or LLaMA-2's "
                                                  "helpful/safety combination (llama2)")
    rule: Literal["contains_gold", "final_number", "ends_within", "format", "length"] = Field(
        "contains_gold", description="kind: rule -- which verifiable rule")
    max_tokens: int = Field(64, ge=1, description="ends_within: the answer must stop within this many tokens")
    pattern: str | None = Field(None, description="format: regular expression the answer must match")
    length_chars: int = Field(400, ge=1, description="length: characters that earn the full reward")
    rm: str | None = Field(None, description="kind: rm -- reward model folder; kind: llama2 -- the helpfulness RM")
    safety_rm: str | None = Field(None, description="kind: llama2 -- the safety RM")
    safety_threshold: float = Field(0.15, description="kind: llama2 -- use the safety score below this sigmoid")
    batch_size: int = Field(8, ge=1, description="answers scored together by a reward model")
    weight: float = Field(1.0, description="this term's weight when the reward is a list of terms (summed)")

    @model_validator(mode="after")
    def _complete(self) -> "RewardConfig":
        if self.kind in ("rm", "llama2") and not self.rm:
            raise ValueError(f"reward kind {self.kind} needs `rm` (a reward model folder from `train rm`)")
        if self.kind == "llama2" and not self.safety_rm:
            raise ValueError("reward kind llama2 needs `safety_rm` as well as `rm`")
        if self.kind == "rule" and self.rule == "format" and not self.pattern:
            raise ValueError("reward rule format needs `pattern` (a regular expression)")
        return self

    def describe(self) -> str:
        if self.kind == "rule":
            extra = {"ends_within": f" ({self.max_tokens} tokens)", "format": f" ({self.pattern!r})",
                     "length": f" ({self.length_chars} chars)"}.get(self.rule, "")
            return f"rule {self.rule}{extra}"
        return f"{self.kind} {self.rm}" + (f" + safety {self.safety_rm}" if self.safety_rm else "")


Reward = Callable[[list[PromptItem], list[str], list[int], list[str]], list[float]]
RewardSpec = RewardConfig | list[RewardConfig]  # one reward, or a weighted sum of several


def describe_reward(spec: RewardSpec) -> str:
    if isinstance(spec, RewardConfig):
        return spec.describe() if spec.weight == 1 else f"{spec.weight:g} x {spec.describe()}"
    return " + ".join(describe_reward(c) for c in spec)

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def contains_gold(answer: str, gold: str) -> bool:
    """Whether `answer` states `gold`: as a number among its numbers, else as a whole phrase."""
    target = _as_number(gold.strip())
    if target is not None:
        return any(_as_number(m) == target for m in _NUMBER.findall(answer))
    return re.search(r"(?<!\w)" + re.escape(gold.strip()) + r"(?!\w)", answer, flags=re.IGNORECASE) is not None


def final_number(answer: str) -> float | None:
    """The last number the answer states (None when it states none)."""
    found = _NUMBER.findall(answer)
    return _as_number(found[-1]) if found else None


def ends_within(finish_reason: str, n_tokens: int, max_tokens: int) -> bool:
    """The answer ended its turn (a stop, not the length limit) within `max_tokens` tokens: the RL rule
    `ends_within` and the pair-label rule `ends_turn` are this one check."""
    return finish_reason == "stop" and n_tokens <= max_tokens


def matches_gold(rule: str, answer: str, gold: str) -> bool:
    """`contains_gold` or `final_number` against the gold answer (pair labels and RL rewards share it)."""
    if rule == "contains_gold":
        return contains_gold(answer, gold)
    if rule == "final_number":
        target = _as_number(gold.strip())
        if target is None:  # else an answer stating no number would "match" a non-numeric gold (None == None)
            raise StageError(f"rule final_number needs a numeric gold answer, got {gold!r}: use contains_gold")
        return final_number(answer) == target
    raise ValueError(f"not a gold rule: {rule!r}")


def make_reward(spec: RewardSpec) -> Reward:
    """The reward function `spec` declares (reward models are loaded once, here)."""
    if isinstance(spec, list):
        if not spec:
            raise StageError("reward: an empty list of terms; give one reward or a list of weighted terms")
        terms = [make_reward(c.model_copy(update={"weight": 1.0})) for c in spec]
        weights = [c.weight for c in spec]

        def weighted_sum(items: list[PromptItem], answers: list[str], n_tokens: list[int], finish: list[str]) -> list[float]:
            scores = [term(items, answers, n_tokens, finish) for term in terms]
            return [sum(w * s[i] for w, s in zip(weights, scores)) for i in range(len(answers))]

        return weighted_sum
    if spec.weight != 1:
        return make_reward([spec])
    cfg = spec
    if cfg.kind == "rule":
        return _rule(cfg)
    from ..chat import ChatFormat
    from .rm import llama2_reward, load_reward_model, score

    helpful, tok = load_reward_model(cfg.rm)
    chat = ChatFormat.from_tokenizer(tok)
    safety = load_reward_model(cfg.safety_rm)[0] if cfg.kind == "llama2" else None

    def rm_reward(items: list[PromptItem], answers: list[str], n_tokens: list[int], finish: list[str]) -> list[float]:
        prompts = [it.messages for it in items]
        h = score(helpful, chat, prompts, answers, cfg.batch_size)
        if safety is None:
            return h
        import torch

        s = score(safety, chat, prompts, answers, cfg.batch_size)
        tagged = torch.tensor([bool(it.meta.get("unsafe")) for it in items])
        return llama2_reward(torch.tensor(h), torch.tensor(s), tagged, cfg.safety_threshold).tolist()

    return rm_reward


def _rule(cfg: RewardConfig) -> Reward:
    def reward(items: list[PromptItem], answers: list[str], n_tokens: list[int], finish: list[str]) -> list[float]:
        out = []
        for it, ans, n, fin in zip(items, answers, n_tokens, finish):
            if cfg.rule in GOLD_RULES:
                if it.gold is None:
                    raise StageError(f"reward rule {cfg.rule}: prompt {it.id} has no gold answer")
                out.append(float(matches_gold(cfg.rule, ans, it.gold)))
            elif cfg.rule == "ends_within":
                out.append(float(ends_within(fin, n, cfg.max_tokens)))
            elif cfg.rule == "format":
                out.append(float(re.search(cfg.pattern or "", ans) is not None))
            else:
                out.append(min(len(ans) / cfg.length_chars, 1.0))
        return out

    return reward


def load_prompt_items(source: str, limit: int | None = None) -> list[PromptItem]:
    """Prompts (with gold answers where known) from `task:<name>` (a built-in or file benchmark task:
    its question, gold = the answer or the gold choice's text) or a JSONL file of records with
    `prompt` (or `messages`, or `turns`) and optional `gold` / `answer`."""
    if source.startswith("task:"):
        from ..tasks.spec import load_items, resolve_task

        spec = resolve_task(source[5:])
        items = []
        for i, it in enumerate(load_items(spec)):
            q = it.get("question") or it.get("prompt") or it.get("text")
            if q is None:
                raise StageError(f"{source}: item {i} has no question/prompt/text field")
            gold = it.get("answer")
            if gold is None and "choices" in it and "gold" in it:
                gold = it["choices"][int(it["gold"])]
            items.append(PromptItem(str(it.get("id", i)), [{"role": "user", "content": str(q)}],
                                    None if gold is None else str(gold)))
        return items[:limit]
    path = Path(source)
    if not path.exists():
        raise StageError(f"prompts: {source} does not exist (a JSONL file, or task:<name>)")
    from ..files import jsonl_rows
    from ..formats import from_prompt
    from ..records import RecordError

    items = []
    for n, rec in jsonl_rows(path):
        if "messages" in rec:
            msgs = list(rec["messages"])
            if msgs and msgs[-1].get("role") == "assistant":  # a full conversation: its last answer is not a prompt
                msgs = msgs[:-1]
        elif "prompt" in rec:  # TRL's prompt-only format: text or a list of messages
            try:
                msgs = from_prompt({"prompt": rec["prompt"]}).messages
            except RecordError as err:
                raise StageError(f"{source}:{n}: {err}") from None
        elif "turns" in rec:
            msgs = [{"role": "user", "content": str(rec["turns"][0])}]
        else:
            raise StageError(f"{source}:{n}: a prompt record needs `prompt`, `messages` or `turns`; has {sorted(rec)}")
        gold = rec.get("gold", rec.get("answer"))
        items.append(PromptItem(str(rec.get("id", n)), msgs, None if gold is None else str(gold),
                                {k: v for k, v in rec.items() if k in ("unsafe", "category")}))
        if limit and len(items) >= limit:
            break
    if not items:
        raise StageError(f"prompts: {source} holds no prompt records")
    return items
