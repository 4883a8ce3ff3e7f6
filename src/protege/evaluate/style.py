"""Style measures that need no judge: what an answer set looks like, and how teacher-like a model is.

Per answer set (pure functions of the text, so they can be recomputed from any answers.jsonl):
    stop_rate        answers that ended their turn before the token budget (from `finish_reasons`)
    mean_chars/words answer length
    list_rate        answers with a bulleted or numbered list (two or more item lines)
    header_rate      answers with a Markdown header line (`#`, `##`, ...)
    code_rate        answers with a fenced code block
    repetition_rate  degenerate answers: one line said three or more times, or most word 4-grams repeated
    refusal_rate     answers that decline ("I'm sorry, but I can't ...", "As an AI ...") in their opening
Per model, given held-out teacher answers (`teacher_nll`): the mean per-token negative log-likelihood
of the teacher's answers under the model, in the model's chat format. Lower = the model would have
written the teacher's answer more readily: a direct, judge-free measure of how well it imitates.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Sequence

from .intervals import bootstrap_ci, ratio_ci

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from ..chat import ChatFormat

__all__ = ["has_list", "has_header", "has_code", "is_degenerate", "is_refusal", "style_measures", "teacher_nll"]

_ITEM = re.compile(r"^\s*(?:[-*+•]|\d{1,3}[.)])\s+\S", re.MULTILINE)
_HEADER = re.compile(r"^\s{0,3}#{1,6}\s+\S", re.MULTILINE)
_FENCE = re.compile(r"```")
_REFUSAL = re.compile(
    r"\b(?:I(?:'m| am) sorry,? but I (?:can(?:no|')t|am unable|won't)|I (?:can(?:no|')t|am unable to|won't) "
    r"(?:help|assist|provide|do|answer|comply|fulfil|fulfill|create|write)|as an AI(?: language model)?,? I|"
    r"I(?:'m| am) not able to (?:help|assist|provide))", re.IGNORECASE)


def has_list(text: str) -> bool:
    return len(_ITEM.findall(text)) >= 2


def has_header(text: str) -> bool:
    return bool(_HEADER.search(text))


def has_code(text: str) -> bool:
    return len(_FENCE.findall(text)) >= 2 or bool(re.search(r"^```", text, re.MULTILINE))


def is_degenerate(text: str, n: int = 4) -> bool:
    """A looping answer: a non-trivial line three or more times, or over half its word n-grams repeats."""
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) >= 8]
    if lines and max(lines.count(ln) for ln in set(lines)) >= 3:
        return True
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 8:
        return False
    return 1 - len(set(grams)) / len(grams) > 0.5


def is_refusal(text: str) -> bool:
    """Declines in its opening (first 300 characters): a refusal, not a caveat at the end."""
    return bool(_REFUSAL.search(text[:300]))


def style_measures(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The measures above over every answer (every turn) of an answer set, with bootstrap intervals
    on the rates. Answers without a recorded finish reason do not count towards `stop_rate`."""
    answers = [a for r in records for a in r.get("answers", [])]
    reasons = [f for r in records for f in (r.get("finish_reasons") or [])]
    out: dict[str, Any] = {"n": len(answers)}
    if not answers:
        return out
    out["mean_chars"] = sum(map(len, answers)) / len(answers)
    out["mean_words"] = sum(len(a.split()) for a in answers) / len(answers)
    known = [float(f == "stop") for f in reasons if f in ("stop", "length")]
    if known:
        out["stop_rate"], out["stop_rate_ci"], out["stop_n"] = sum(known) / len(known), bootstrap_ci(known), len(known)
    for name, test in (("list_rate", has_list), ("header_rate", has_header), ("code_rate", has_code),
                       ("repetition_rate", is_degenerate), ("refusal_rate", is_refusal)):
        vals = [float(test(a)) for a in answers]
        out[name], out[name + "_ci"] = sum(vals) / len(vals), bootstrap_ci(vals)
    return out


def teacher_nll(model: PreTrainedModel, chat_format: ChatFormat, conversations: Sequence[list[dict[str, str]]],
                ids: Sequence[str] | None = None, iters: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Mean per-token NLL (nats) of the assistant turns of `conversations` under `model`.

    Each conversation is the teacher's (user turns + the teacher's answers), encoded with the model's
    own chat format; only assistant tokens count. Returns {"nll", "nll_ci" (bootstrap over
    conversations, token-weighted), "tokens", "n", "per_item": {id: [NLL sum, tokens]}} (`ids` name the
    conversations; default their index), so two models can be compared on the same answers. The LM head runs only on the scored positions,
    chunked, so a 262K vocabulary costs no more memory than a small one.
    """
    import torch

    from ..lm_head import head_rows, lm_head_parts
    from ..train.logprobs import token_logprobs

    parts = lm_head_parts(model)
    device = next(model.parameters()).device
    per: list[tuple[float, int]] = []
    names: list[str] = []
    with torch.no_grad():
        for k, conv in enumerate(conversations):
            enc = chat_format.encode(conv)
            seq = torch.tensor([enc.input_ids], device=device)
            mask = torch.tensor(enc.assistant_mask[1:], device=device).bool()
            targets = seq[0, 1:][mask]
            if targets.numel() == 0:
                continue
            if parts is not None:
                hidden = parts.decoder(input_ids=seq).last_hidden_state[0, :-1][mask]
                weight, rows = head_rows(parts.head)
                logp = token_logprobs(hidden, weight, targets, parts.softcap, row_override=rows)
            else:  # not a plain head: the model's own forward (all positions)
                z = torch.log_softmax(model(input_ids=seq).logits[0, :-1].float(), -1)[mask]
                logp = z.gather(-1, targets[:, None])[:, 0]
            per.append((-float(logp.sum()), int(targets.numel())))
            names.append(str(ids[k]) if ids is not None else str(k))
    if not per:
        return {"nll": float("nan"), "nll_ci": (float("nan"), float("nan")), "tokens": 0, "n": 0}
    total, tokens = sum(s for s, _ in per), sum(t for _, t in per)
    return {"nll": total / tokens, "nll_ci": ratio_ci(per, iters, seed),
            "tokens": tokens, "n": len(per), "per_item": {n: [round(s, 4), t] for n, (s, t) in zip(names, per)}}
