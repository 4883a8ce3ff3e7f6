"""Preference pairs for RM and DPO: comparisons -> (chosen, rejected) examples -> packed batches.

Each side is `prompt + answer` encoded with the model's chat format; only the answer's tokens
(and its end-of-turn token) are scored, never earlier assistant turns of a multi-turn prompt.
A pair's two sequences are truncated with the *same* prompt cut, so the comparison stays
about the answers: the prompt loses its oldest tokens first (its first token kept when it is
BOS), then an answer still too long loses its end. Every truncation is counted.

A micro-batch is a list of pair indices. `collate_pairs` packs its 2B sequences into rows
(first-fit decreasing, positions restarting per sequence, so attention never crosses them)
and returns `seq_ids` in pair order: sequence 2i is pair i's chosen, 2i + 1 its rejected.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..chat import ChatFormat
from ..formats import iter_source
from ..records import Comparison, RecordError
from .data import Example, collate, first_fit_decreasing
from .losses import IGNORE_INDEX
from .settings import PreferenceSettings

__all__ = ["PairExample", "PairStats", "load_comparisons", "tokenize_pairs", "plan_pair_batches", "collate_pairs",
           "pairs_hash", "load_pair_sets", "can_share_prompt", "additive_mask"]


@dataclass
class PairExample:
    id: str
    chosen: Example
    rejected: Example
    margin: float  # NaN when the record gives none
    prompt_len: int = 0  # tokens of the (possibly cut) prompt both sides start with

    @property
    def tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


@dataclass
class PairStats:
    pairs: int = 0
    truncated: int = 0  # pairs where a prompt or an answer was cut to fit max_length
    skipped: dict[str, int] = field(default_factory=dict)  # unusable records by reason (read or tokenised)
    tokens: int = 0
    scored_tokens: int = 0


def load_comparisons(path: str | Path, skipped: dict[str, int]) -> list[Comparison]:
    """Comparisons from any supported preference file; unusable pairs are counted into `skipped`."""
    recs = []
    for i, rec in enumerate(iter_source(path, skipped=skipped)):
        if not isinstance(rec, Comparison):
            raise RecordError(f"record {i + 1} is a {type(rec).__name__}, this method needs preference pairs "
                              "(chosen/rejected)", str(path))
        recs.append(rec)
    if not recs:
        raise RecordError("no preference pairs in this dataset", str(path))
    return recs


def _answer_example(prompt_ids: list[int], full: Any, keep_prompt: list[int], room: int) -> Example:
    n = len(prompt_ids)
    answer, mask = full.input_ids[n:][:room], full.assistant_mask[n:][:room]
    ids = keep_prompt + answer
    m = [0] * len(keep_prompt) + mask
    labels = [ids[t + 1] if m[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
    return Example(ids, labels)


def tokenize_pairs(comparisons: list[Comparison], chat: ChatFormat, max_length: int, stats: PairStats) -> list[PairExample]:
    """Encode each pair's two sides; truncate both with one prompt cut; count what was cut or dropped."""
    bos = chat.tokenizer.bos_token_id
    out = []
    for rec in comparisons:
        prompt_ids = chat.encode_prompt(rec.prompt)
        sides = [chat.encode(rec.prompt + [ans]) for ans in (rec.chosen, rec.rejected)]
        if any(s.input_ids[:len(prompt_ids)] != prompt_ids for s in sides):  # the training == inference invariant
            raise RecordError(f"pair {rec.id}: the chat template renders the prompt differently with an answer")
        longest = max(len(s.input_ids) for s in sides) - len(prompt_ids)
        keep = prompt_ids
        if len(prompt_ids) + longest > max_length:
            stats.truncated += 1
            n_keep = min(len(prompt_ids), max(max_length - longest, max_length // 2))
            head = prompt_ids[:1] if prompt_ids and prompt_ids[0] == bos and n_keep > 1 else []
            keep = head + prompt_ids[len(prompt_ids) - (n_keep - len(head)):] if n_keep > len(head) else head
        room = max_length - len(keep)
        pair = PairExample(rec.id, *(_answer_example(prompt_ids, s, keep, room) for s in sides),
                           math.nan if rec.margin is None else float(rec.margin), len(keep))
        if pair.chosen.n_labels == 0 or pair.rejected.n_labels == 0:
            stats.skipped["no answer tokens left after truncation"] = stats.skipped.get(
                "no answer tokens left after truncation", 0) + 1
            continue
        if pair.chosen.input_ids == pair.rejected.input_ids:
            stats.skipped["chosen == rejected after truncation"] = stats.skipped.get(
                "chosen == rejected after truncation", 0) + 1
            continue
        stats.pairs += 1
        stats.tokens += pair.tokens
        stats.scored_tokens += pair.chosen.n_labels + pair.rejected.n_labels
        out.append(pair)
    return out


def plan_pair_batches(n_pairs: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Every micro-batch of the run, in order: a seeded shuffle of the pairs per epoch, cut into batches."""
    plan = []
    for epoch in range(epochs):
        order = list(range(n_pairs))
        random.Random(f"{seed}/pairs/{epoch}").shuffle(order)
        plan.extend(order[b:b + batch_size] for b in range(0, n_pairs, batch_size))
    return plan


def scored_positions(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """score_index / score_target / score_seq from a collated batch's shifted labels and seq_ids."""
    flat = batch["labels"].reshape(-1)
    keep = (flat != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    return {"score_index": keep, "score_target": flat[keep], "score_seq": batch["seq_ids"].reshape(-1)[keep]}


def collate_pairs(pairs: list[PairExample], pad_id: int, max_length: int, share_prompt: bool = False) -> dict[str, torch.Tensor]:
    """B pairs -> one packed batch for per-sequence scoring (sequence 2i = pair i's chosen, 2i + 1 its rejected).

    Returns `input_ids`, `position_ids` (B', T); `attention_mask`: None (packed sequences, positions
    restarting: transformers isolates them) or, with `share_prompt`, a boolean (B', 1, T, T) mask;
    `score_index` / `score_target` / `score_seq` (N,): which flat hidden position predicts which
    token of which sequence; `last_index` (2B,): flat position of each sequence's last token; `margin` (B,).

    `share_prompt` lays each pair out once as [prompt, chosen answer, rejected answer]: both answers
    continue the prompt's positions, the rejected answer's rows of the mask see the prompt but not
    the chosen answer, and the prompt's last position predicts the first token of both answers, so
    the prompt is encoded once instead of twice (the mask replaces transformers' own causal and
    sliding-window masks, so callers use it only where no sequence exceeds the sliding window).
    """
    margin = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    if not share_prompt:
        seqs = [e for p in pairs for e in (p.chosen, p.rejected)]
        width = max(max_length, max(len(e.input_ids) for e in seqs))
        rows = first_fit_decreasing(list(range(len(seqs))), [len(e.input_ids) for e in seqs], width)
        batch = collate([[seqs[i] for i in row] for row in rows], pad_id, with_seq_ids=True)
        packed_order = torch.tensor([i for row in rows for i in row], dtype=torch.long)  # packed index -> pair order
        seq = batch["seq_ids"]
        batch["seq_ids"] = torch.where(seq >= 0, packed_order[seq.clamp(min=0)], seq)
        last = torch.empty_like(batch["last_index"])
        last[packed_order] = batch["last_index"]
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "attention_mask": None,
                **scored_positions(batch), "last_index": last, "margin": margin}

    prompt_len = [p.prompt_len for p in pairs]
    seg = [len(p.chosen.input_ids) + len(p.rejected.input_ids) - n for p, n in zip(pairs, prompt_len)]
    width = max(2 * max_length, max(seg))
    rows = first_fit_decreasing(list(range(len(seg))), seg, width)
    T = max(sum(seg[i] for i in row) for row in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), T), dtype=torch.long)
    mask = torch.zeros((len(rows), 1, T, T), dtype=torch.bool)
    idx, tgt, sq, last = [], [], [], [0] * (2 * len(pairs))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            p, n = pairs[i], prompt_len[i]
            c_ans, r_ans = p.chosen.input_ids[n:], p.rejected.input_ids[n:]
            c0, r0 = at + n, at + n + len(c_ans)  # where each answer starts in the row
            ids[r, at:at + n] = torch.tensor(p.chosen.input_ids[:n])
            ids[r, c0:r0] = torch.tensor(c_ans)
            ids[r, r0:r0 + len(r_ans)] = torch.tensor(r_ans)
            pos[r, at:r0] = torch.arange(n + len(c_ans))
            pos[r, r0:r0 + len(r_ans)] = torch.arange(n, n + len(r_ans))
            for lo, hi in ((at, c0), (c0, r0), (r0, r0 + len(r_ans))):
                mask[r, 0, lo:hi, lo:hi] = causal[lo:hi, lo:hi]
            mask[r, 0, c0:r0 + len(r_ans), at:c0] = True  # both answers see the whole prompt
            for side, (ex, start) in enumerate(((p.chosen, c0), (p.rejected, r0))):
                for t, y in enumerate(ex.labels):
                    if y != IGNORE_INDEX:
                        idx.append(r * T + (at + t if t < n else start + t - n))
                        tgt.append(y)
                        sq.append(2 * i + side)
                last[2 * i + side] = r * T + start + len(ex.input_ids) - n - 1
            at = r0 + len(r_ans)
        pos[r, at:] = torch.arange(1, T - at + 1) + (pos[r, at - 1] if at else -1)
        for t in range(at, T):  # padding attends to itself only (no all-masked softmax rows)
            mask[r, 0, t, t] = True
    return {"input_ids": ids, "position_ids": pos, "attention_mask": mask,
            "score_index": torch.tensor(idx, dtype=torch.long), "score_target": torch.tensor(tgt, dtype=torch.long),
            "score_seq": torch.tensor(sq, dtype=torch.long), "last_index": torch.tensor(last, dtype=torch.long),
            "margin": margin}


def can_share_prompt(model: torch.nn.Module, config: PreferenceSettings) -> bool:
    """`share_prompt` is safe: the custom mask replaces transformers' sliding-window mask, so no sequence
    (prompt + one answer <= max_length) may be longer than the model's sliding window."""
    if not getattr(config, "share_prompt", False):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    window = getattr(base.config, "sliding_window", None)
    return window is None or config.max_length <= window


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Boolean (B, 1, T, T) "may attend" mask -> the additive float mask every attention backend accepts."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def pairs_hash(pairs: list[PairExample]) -> str:
    """Content hash of tokenised pairs: what a cached reference log-prob or a checkpoint must match. Fed pair
    by pair (not `files.json_digest` of one list): 100k long pairs would make one string of gigabytes."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.id, p.chosen.input_ids, p.chosen.labels, p.rejected.input_ids, p.rejected.labels]).encode())
    return h.hexdigest()[:16]


def load_pair_sets(config: PreferenceSettings, chat: ChatFormat, method: str) -> tuple[list[PairExample], list[PairExample], PairStats, PairStats]:
    """(train pairs, held-out pairs, their stats) from `config.datasets` / `eval_dataset` (PreferenceSettings)."""
    from ..errors import StageError
    from .data import split_held_out

    if not config.datasets:
        raise StageError(f"{method}: `datasets` is empty; give one or more preference files (datasets: [pairs.jsonl])")
    stats, eval_stats = PairStats(), PairStats()
    train, held = [], []
    for path in config.datasets:
        recs = load_comparisons(path, stats.skipped)
        if config.eval_dataset is None:
            recs, h = split_held_out(recs, config.eval_fraction, config.eval_max_examples // len(config.datasets),
                                     config.seed)
            held.extend(h)
        train.extend(tokenize_pairs(recs, chat, config.max_length, stats))
    if config.eval_dataset:
        held = load_comparisons(config.eval_dataset, eval_stats.skipped)[: config.eval_max_examples]
    eval_pairs = tokenize_pairs(held, chat, config.max_length, eval_stats)
    if not train:
        raise StageError(f"{method}: no usable training pair (skipped: {stats.skipped or 'none'})")
    return train, eval_pairs, stats, eval_stats
