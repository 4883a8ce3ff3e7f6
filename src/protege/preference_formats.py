"""Importers from the community's preference formats into protege `Comparison` records.

- `hh`:            Anthropic HH-RLHF: `chosen` / `rejected` full transcripts ("\\n\\nHuman: ... \\n\\nAssistant: ...")
                   that share every turn but the last assistant one.
- `trl`:           TRL's preference format: `prompt` + `chosen` + `rejected`, each a string or a message list
                   (or, TRL's "implicit prompt", no `prompt` and two full message lists with a shared prefix).
- `sharegpt-pref`: LLaMA-Factory's ShareGPT preference format: `conversations` + `chosen` / `rejected` `{from, value}`.
- `ultrafeedback`: rated completions (`instruction`/`prompt` + `completions: [{response, overall_score | fine-grained_score}]`)
                   -> the best-rated against the worst-rated, margin = their score difference.
- `webgpt`:        WebGPT comparisons (`question.full_text`, `answer_0/1`, `score_0/1`) -> margin = |score difference|.
- `summarize`:     OpenAI summarize-from-feedback comparisons (`info.post`, `summaries: [{text}] x 2`, `choice`).

A record that cannot be a pair (equal answers, prompts that differ, a tie in rating) raises
`SkipRecord`: the reader counts it by reason instead of failing, and never drops it silently.
"""

from __future__ import annotations

import re
from typing import Any

from .records import ROLE_ALIASES, Comparison, RecordError, SkipRecord, check_messages, record_id

__all__ = ["PREFERENCE_FORMATS", "detect_preference_format", "convert_preference", "parse_transcript"]

PREFERENCE_FORMATS = ("hh", "trl", "sharegpt-pref", "ultrafeedback", "webgpt", "summarize")

_SPEAKER = re.compile(r"\n\n(Human|Assistant):[ \t]?")


def detect_preference_format(obj: dict[str, Any]) -> str | None:
    """The preference format of one record by its keys, or None when it is not a preference record."""
    if "chosen" in obj and "rejected" in obj:
        if "conversations" in obj:
            return "sharegpt-pref"
        if "prompt" not in obj and isinstance(obj["chosen"], str):
            return "hh"
        if isinstance(obj.get("prompt"), list) and isinstance(obj["chosen"], dict) and "role" in obj["chosen"]:
            return None  # protege's own Comparison
        return "trl"
    if "completions" in obj and ("instruction" in obj or "prompt" in obj):
        return "ultrafeedback"
    if "answer_0" in obj and "answer_1" in obj:
        return "webgpt"
    if "summaries" in obj and "choice" in obj:
        return "summarize"
    return None


def parse_transcript(text: str, field: str) -> list[dict[str, str]]:
    """"\\n\\nHuman: a\\n\\nAssistant: b" -> [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]."""
    if not isinstance(text, str):
        raise RecordError(f"`{field}`: expected a transcript string, got {type(text).__name__}")
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip("\n")
    parts = _SPEAKER.split(text)
    if parts[0].strip():
        raise RecordError(f"`{field}`: text before the first \"Human:\" / \"Assistant:\" turn")
    messages: list[dict[str, str]] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        if messages and messages[-1]["role"] == role:  # two turns of one speaker in a row: one message
            messages[-1]["content"] += "\n\n" + content.strip()
        else:
            messages.append({"role": role, "content": content.strip()})
    if not messages:
        raise RecordError(f"`{field}`: no \"Human:\" / \"Assistant:\" turns found")
    return messages


def _pair(prompt: list[dict[str, str]], chosen: str, rejected: str, margin: float | None, obj: dict[str, Any],
          source: str, used: tuple[str, ...]) -> Comparison:
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise RecordError("`chosen` and `rejected` must be text")
    if not chosen.strip() or not rejected.strip():
        raise SkipRecord("empty response")
    if chosen.strip() == rejected.strip():
        raise SkipRecord("chosen == rejected")
    prompt = check_messages(prompt, "prompt")
    if prompt[-1]["role"] != "user":
        raise RecordError("`prompt`: last message must be from the user")
    meta = {k: v for k, v in obj.items() if k not in used and k != "id"}
    return Comparison(prompt, {"role": "assistant", "content": chosen}, {"role": "assistant", "content": rejected},
                      margin, record_id(obj), source, meta)


def _split_shared(chosen: list[dict[str, str]], rejected: list[dict[str, str]]) -> tuple[list, str, str]:
    """(shared prompt turns, last chosen answer, last rejected answer) of two full conversations."""
    if not chosen or not rejected or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise RecordError("`chosen` / `rejected`: each must end with an assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise SkipRecord("prompts differ")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if value.lstrip("\n").startswith(("Human:", "Assistant:")):
            return parse_transcript(value, field)
        return [{"role": "user" if field == "prompt" else "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RecordError(f"`{field}`: expected a string or a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RecordError(f"`{field}[{i}]`: expected an object with `role` and `content`")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _from_hh(obj: dict[str, Any], source: str) -> Comparison:
    prompt, chosen, rejected = _split_shared(parse_transcript(obj["chosen"], "chosen"),
                                             parse_transcript(obj["rejected"], "rejected"))
    if not prompt:
        raise RecordError("transcript has no Human turn before the last Assistant turn")
    return _pair(prompt, chosen, rejected, None, obj, source, ("chosen", "rejected"))


def _from_trl(obj: dict[str, Any], source: str) -> Comparison:
    chosen, rejected = _messages(obj["chosen"], "chosen"), _messages(obj["rejected"], "rejected")
    if "prompt" in obj:
        prompt = _messages(obj["prompt"], "prompt")
        if prompt and prompt[-1]["role"] == "assistant" and not str(prompt[-1]["content"] or "").strip():
            prompt = prompt[:-1]  # an HH-style prompt string ends with an empty "Assistant:" cue
        if len(chosen) != 1 or len(rejected) != 1 or chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
            raise RecordError("`chosen` / `rejected`: expected one assistant answer each after an explicit `prompt`")
        c, r = chosen[0]["content"], rejected[0]["content"]
    else:
        prompt, c, r = _split_shared(chosen, rejected)
    margin = obj.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise RecordError(f"`margin`: expected a number or null, got {margin!r}")
    return _pair(prompt, c, r, None if margin is None else float(margin), obj, source,
                 ("prompt", "chosen", "rejected", "margin"))


def _sharegpt_turn(turn: Any, field: str) -> dict[str, str]:
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
        raise RecordError(f"`{field}`: expected an object with `from` and `value`")
    role = ROLE_ALIASES.get(str(turn["from"]).lower())
    if role is None:
        raise RecordError(f"`{field}.from`: unknown speaker {turn['from']!r} (expected human, gpt or system)")
    return {"role": role, "content": turn["value"]}


def _from_sharegpt_pref(obj: dict[str, Any], source: str) -> Comparison:
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        raise RecordError("`conversations`: expected a non-empty list of {from, value} turns")
    prompt = [_sharegpt_turn(t, f"conversations[{i}]") for i, t in enumerate(turns)]
    if isinstance(obj.get("system"), str) and obj["system"].strip():
        prompt.insert(0, {"role": "system", "content": obj["system"]})
    chosen, rejected = _sharegpt_turn(obj["chosen"], "chosen"), _sharegpt_turn(obj["rejected"], "rejected")
    return _pair(prompt, chosen["content"], rejected["content"], None, obj, source,
                 ("conversations", "chosen", "rejected", "system"))


def _score(completion: dict[str, Any], i: int) -> float:
    for key in ("overall_score", "score", "rating"):
        if isinstance(completion.get(key), (int, float)) and not isinstance(completion.get(key), bool):
            return float(completion[key])
    fine = completion.get("fine-grained_score")
    if isinstance(fine, (int, float)) and not isinstance(fine, bool):
        return float(fine)
    raise RecordError(f"`completions[{i}]`: no numeric overall_score / fine-grained_score")


def _from_ultrafeedback(obj: dict[str, Any], source: str) -> Comparison:
    text = obj.get("instruction", obj.get("prompt"))
    if not isinstance(text, str):
        raise RecordError("`instruction`: expected a string")
    comps = obj["completions"]
    if not isinstance(comps, list):
        raise RecordError("`completions`: expected a list")
    rated = []
    for i, c in enumerate(comps):
        if not isinstance(c, dict) or not isinstance(c.get("response"), str):
            raise RecordError(f"`completions[{i}]`: expected an object with a `response` string")
        rated.append((_score(c, i), i, c["response"]))
    if len(rated) < 2:
        raise SkipRecord("fewer than 2 completions")
    best, worst = max(rated), min(rated)  # ties in score break by position, reproducibly
    if best[0] == worst[0]:
        raise SkipRecord("all completions rated equal")
    return _pair([{"role": "user", "content": text}], best[2], worst[2], best[0] - worst[0], obj, source,
                 ("instruction", "prompt", "completions"))


def _from_webgpt(obj: dict[str, Any], source: str) -> Comparison:
    q = obj.get("question")
    text = q.get("full_text") if isinstance(q, dict) else q
    if not isinstance(text, str):
        raise RecordError("`question.full_text`: expected a string")
    s0, s1 = obj.get("score_0"), obj.get("score_1")
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in (s0, s1)):
        raise RecordError("`score_0` / `score_1`: expected numbers")
    if s0 == s1:
        raise SkipRecord("tie")
    a, b = (obj["answer_0"], obj["answer_1"]) if s0 > s1 else (obj["answer_1"], obj["answer_0"])
    return _pair([{"role": "user", "content": text}], a, b, abs(float(s0) - float(s1)), obj, source,
                 ("question", "answer_0", "answer_1", "score_0", "score_1", "quotes_0", "quotes_1"))


def _from_summarize(obj: dict[str, Any], source: str) -> Comparison:
    info, summaries, choice = obj.get("info"), obj["summaries"], obj["choice"]
    post = info.get("post") if isinstance(info, dict) else None
    if not isinstance(post, str):
        raise RecordError("`info.post`: expected a string")
    if not isinstance(summaries, list) or len(summaries) != 2 or choice not in (0, 1):
        raise RecordError("`summaries`: expected two {text} objects and `choice` 0 or 1")
    texts = [s.get("text") if isinstance(s, dict) else None for s in summaries]
    title = info.get("title") or ""
    prompt = f"Summarize this post.\n\nTitle: {title}\n\n{post}" if title else f"Summarize this post.\n\n{post}"
    return _pair([{"role": "user", "content": prompt}], texts[choice], texts[1 - choice], None, obj, source,
                 ("info", "summaries", "choice"))


_IMPORTERS = {"hh": _from_hh, "trl": _from_trl, "sharegpt-pref": _from_sharegpt_pref,
              "ultrafeedback": _from_ultrafeedback, "webgpt": _from_webgpt, "summarize": _from_summarize}


_REQUIRED = {"hh": ("chosen", "rejected"), "trl": ("chosen", "rejected"),
             "sharegpt-pref": ("conversations", "chosen", "rejected"), "ultrafeedback": ("completions",),
             "webgpt": ("answer_0", "answer_1"), "summarize": ("summaries", "choice")}


def convert_preference(obj: dict[str, Any], fmt: str, source: str = "") -> Comparison:
    """One decoded object in preference format `fmt` -> a validated Comparison (or SkipRecord)."""
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in _REQUIRED[fmt] if k not in obj]
    if missing:
        raise RecordError(f"missing field `{missing[0]}` (a {fmt} record needs {', '.join(_REQUIRED[fmt])})")
    return _IMPORTERS[fmt](obj, source or fmt)
