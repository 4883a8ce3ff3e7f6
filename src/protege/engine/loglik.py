"""Log-likelihood of continuations given a context, sharing one context forward across options.

Tokenization follows lm-evaluation-harness exactly (so scores are comparable with published numbers):
trailing spaces of the context move to the continuation; the continuation tokens are
`tok(context + continuation)[len(tok(context)):]`; the model sees `tok(context) + continuation`;
an empty context is replaced by the BOS (else EOS) token.

Because the context tokens are the same for every option, we run the context once per question
(batched over questions, left-padded, `logits_to_keep=1` so the LM head runs on one position; the
prefix that all questions of a batch share -- a few-shot block, a reading passage -- is run only once),
copy its KV cache once per option, and run only the short option tokens on top. lm-eval instead
runs the full `context + option` sequence once per option and computes logits on every position,
which for a 262K-token vocabulary (Gemma 3) is most of the work.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from ..models import cache_kwarg, output_cache

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["EncodedQuestion", "tok_encode", "encode_question", "score_questions", "iter_sorted", "score_sorted",
           "loglikelihood_reference"]


@dataclass
class EncodedQuestion:
    context_ids: list[int]
    continuation_ids: list[list[int]]  # one list per option, never empty


def _bos_text(tokenizer: PreTrainedTokenizerBase) -> str | None:
    tid = _prefix_token_id(tokenizer)
    return tokenizer.decode([tid]) if tid is not None else None


def _prefix_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    # lm-eval's `prefix_token_id`: BOS, else EOS.
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def tok_encode(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """lm-eval's `HFLM.tok_encode`: the tokenizer's default special tokens, unless the text already
    starts with the BOS text (a rendered chat template does), so BOS is never doubled."""
    kwargs: dict[str, Any] = {}
    if add_special_tokens is not None:
        kwargs["add_special_tokens"] = add_special_tokens
    else:
        bos = _bos_text(tokenizer)
        if bos and text.startswith(bos):
            kwargs["add_special_tokens"] = False
    return tokenizer.encode(text, **kwargs)


def encode_question(tokenizer: PreTrainedTokenizerBase, context: str, continuations: Sequence[str]) -> EncodedQuestion:
    """Token ids of one multiple-choice question, split at the token boundary as lm-eval does."""
    if not context:
        prefix = _prefix_token_id(tokenizer)
        conts = []
        for cont in continuations:
            ids = tok_encode(tokenizer, cont, add_special_tokens=False)
            conts.append(ids[1:] if ids and ids[0] == prefix else ids)
        return EncodedQuestion([prefix], conts)
    n_spaces = len(context) - len(context.rstrip())
    moved = context[len(context) - n_spaces:] if n_spaces else ""
    ctx = context[: len(context) - n_spaces]
    ctx_ids = tok_encode(tokenizer, ctx)
    conts = []
    for cont in continuations:
        whole = tok_encode(tokenizer, ctx + moved + cont)
        ids = whole[len(ctx_ids):]
        if not ids:
            raise ValueError(f"option {cont!r} tokenizes to nothing after the context; it cannot be scored")
        conts.append(ids)
    return EncodedQuestion(ctx_ids, conts)


def _select_cache(cache: Any, index: torch.Tensor) -> Any:
    """A copy of `cache` holding rows `index` (with repeats). Layers are shallow-copied and their
    tensors re-indexed, so the shared context cache stays intact for the next chunk of options."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    new.batch_select_indices(index)
    return new


def _common_prefix(seqs: Sequence[list[int]]) -> int:
    n = min(map(len, seqs))
    for i in range(n):
        t = seqs[0][i]
        if any(s[i] != t for s in seqs):
            return i
    return n


@torch.no_grad()
def score_questions(model: torch.nn.Module, questions: Sequence[EncodedQuestion], pad_id: int = 0,
                    max_length: int | None = None, logits_budget: int = 2**26) -> list[list[tuple[float, bool]]]:
    """`[(log P(option | context), option is the greedy continuation)]` per question and option.

    One batched forward over the contexts (left-padded), then the options' tokens in chunks that keep
    the logits tensor under `logits_budget` elements (rows × positions × vocab).
    """
    device = next(model.parameters()).device
    cache_kw = cache_kwarg(model)
    if max_length:  # keep the longest option whole; drop the oldest context tokens (lm-eval does too)
        questions = [EncodedQuestion(q.context_ids[-max(1, max_length - max(map(len, q.continuation_ids))):],
                                     q.continuation_ids) for q in questions]
    lens = [len(q.context_ids) for q in questions]
    # Few-shot contexts share their solved examples, questions on one passage share the passage
    # (`iter_sorted` batches them together): run the common token prefix once and broadcast its
    # cache, so each row adds only its own suffix (left-padded: the padding sits *between* prefix and
    # suffix, masked out). Not when a sliding window could see the padded layout differently.
    prefix = min(_common_prefix([q.context_ids for q in questions]), min(lens) - 1)
    window = getattr(model.config, "sliding_window", None)
    if prefix < 16 or len(questions) < 2 or (window and prefix + max(lens) - prefix >= window // 2):
        prefix = 0
    cache = None
    if prefix:
        pre = model(input_ids=torch.tensor([questions[0].context_ids[:prefix]], device=device), use_cache=True,
                    logits_to_keep=1)
        cache = output_cache(pre)
        cache.batch_select_indices(torch.zeros(len(questions), dtype=torch.long, device=device))
    width = max(lens) - prefix
    ids = torch.full((len(questions), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(questions), prefix + width), dtype=torch.long)
    mask[:, :prefix] = 1
    for i, q in enumerate(questions):
        ids[i, width - (lens[i] - prefix):] = torch.tensor(q.context_ids[prefix:])
        mask[i, prefix + width - (lens[i] - prefix):] = 1
    ids, mask = ids.to(device), mask.to(device)
    # Positions count real tokens only, so a padded row sees the positions it would see alone.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, prefix:]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                **{cache_kw: cache})
    first_logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (Q, V): predicts each option's 1st token
    cache = output_cache(out)

    rows = [(qi, oi) for qi, q in enumerate(questions) for oi in range(len(q.continuation_ids))]
    results: list[list[tuple[float, bool]]] = [[(0.0, False)] * len(q.continuation_ids) for q in questions]
    for qi, oi in rows:  # the first option token is scored from the context's last position
        tok = questions[qi].continuation_ids[oi][0]
        results[qi][oi] = (first_logp[qi, tok].item(), bool(first_logp[qi].argmax().item() == tok))
    rest = [(qi, oi) for qi, oi in rows if len(questions[qi].continuation_ids[oi]) > 1]
    if not rest:
        return results
    vocab = first_logp.shape[-1]
    longest = max(len(questions[qi].continuation_ids[oi]) - 1 for qi, oi in rest)
    per_chunk = max(1, logits_budget // (longest * vocab))
    for start in range(0, len(rest), per_chunk):
        chunk = rest[start:start + per_chunk]
        conts = [questions[qi].continuation_ids[oi] for qi, oi in chunk]
        span = max(len(c) - 1 for c in conts)
        # Inputs are option tokens 0..m-2; their logits predict tokens 1..m-1. Right padding is safe:
        # under a causal mask no real token attends to a later pad.
        inp = torch.full((len(chunk), span), pad_id, dtype=torch.long)
        cmask = torch.zeros((len(chunk), span), dtype=torch.long)
        for r, c in enumerate(conts):
            inp[r, :len(c) - 1] = torch.tensor(c[:-1])
            cmask[r, :len(c) - 1] = 1
        qidx = torch.tensor([qi for qi, _ in chunk], device=device)
        full_mask = torch.cat([mask[qidx], cmask.to(device)], dim=1)
        pos = torch.tensor([lens[qi] for qi, _ in chunk], device=device)[:, None] + torch.arange(span, device=device)
        logits = model(input_ids=inp.to(device), attention_mask=full_mask, position_ids=pos,
                       use_cache=True, **{cache_kw: _select_cache(cache, qidx)}).logits  # (R, span, V)
        logp = torch.log_softmax(logits.float(), dim=-1)
        for r, ((qi, oi), c) in enumerate(zip(chunk, conts)):
            target = torch.tensor(c[1:], device=device)
            lp = logp[r, :len(c) - 1]
            first, greedy = results[qi][oi]
            total = first + lp.gather(-1, target[:, None]).sum().item()
            results[qi][oi] = (total, greedy and bool((lp.argmax(-1) == target).all().item()))
    return results


def _prefix_groups(questions: Sequence[EncodedQuestion], min_shared: int) -> list[list[int]]:
    """Indices grouped into runs whose contexts share at least `min_shared` leading tokens.

    Sorting the contexts' token lists puts every context next to the one it shares the longest prefix
    with, so one pass over neighbours finds the runs: the questions of one reading passage (AGIEval,
    RACE: 4-8 questions per passage), or every question of a few-shot set. Questions that share nothing
    come back as runs of one.
    """
    order = sorted(range(len(questions)), key=lambda i: questions[i].context_ids)
    groups: list[list[int]] = []
    for i in order:
        if groups and _common_prefix([questions[groups[-1][-1]].context_ids, questions[i].context_ids]) >= min_shared:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def iter_sorted(model: torch.nn.Module, questions: Sequence[EncodedQuestion], batch_size: int = 8, pad_id: int = 0,
                max_length: int | None = None, min_shared: int = 32) -> Iterator[tuple[int, list[tuple[float, bool]]]]:
    """(index, `score_questions` row) for every question, batched so the decoder runs as few tokens as possible.

    Two savings, both exact. Questions whose contexts share a long prefix (a reading passage asked about
    several times, a few-shot block) are batched together, so `score_questions` runs that prefix once
    for the batch: on AGIEval's lsat-rc (10 passages for 60 questions) that is ~4x fewer context tokens,
    where lm-eval runs every context whole. The rest are batched by context length, longest first (as
    lm-eval's Collator does, so an out-of-memory shows at once): left padding makes every row as long as
    its batch's longest context, and in file order 0-shot long passages were mostly padding. Yields batch
    by batch, so callers can show progress.
    """
    shared: list[list[int]] = []
    alone: list[int] = []
    for group in _prefix_groups(questions, min_shared):
        (shared.append(group) if len(group) > 1 else alone.extend(group))
    by_length = lambda idx: sorted(idx, key=lambda i: -len(questions[i].context_ids))  # noqa: E731
    batches = [chunk for group in shared for chunk in _chunks(by_length(group), batch_size)]
    batches += _chunks(by_length(alone), batch_size)
    batches.sort(key=lambda b: -len(questions[b[0]].context_ids))
    from ..lm_head import fp32_head

    with fp32_head(model):
        for chunk in batches:
            yield from zip(chunk, score_questions(model, [questions[i] for i in chunk], pad_id=pad_id,
                                                  max_length=max_length))


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[s:s + size] for s in range(0, len(items), size)]


def score_sorted(model: torch.nn.Module, questions: Sequence[EncodedQuestion], batch_size: int = 8, pad_id: int = 0,
                 max_length: int | None = None) -> list[list[tuple[float, bool]]]:
    """`score_questions` over many questions (batched by length, `iter_sorted`), in the given order."""
    results: list[list[tuple[float, bool]]] = [[] for _ in questions]
    for i, row in iter_sorted(model, questions, batch_size, pad_id, max_length):
        results[i] = row
    return results


@torch.no_grad()
def loglikelihood_reference(model: torch.nn.Module, context_ids: list[int], continuation_ids: list[int]) -> float:
    """The straightforward computation: one full forward of context+continuation, summing the
    log-probabilities of the continuation tokens. Used by tests to check `score_questions`."""
    device = next(model.parameters()).device
    seq = torch.tensor([context_ids + continuation_ids], device=device)
    logp = torch.log_softmax(model(input_ids=seq).logits[0].float(), dim=-1)  # (T, V)
    n = len(context_ids)
    return sum(logp[n - 1 + k, t].item() for k, t in enumerate(continuation_ids))
