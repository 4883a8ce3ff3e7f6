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
from .data import Example, collate
from .losses import IGNORE_INDEX

__all__ = ["PairExample", "PairStats", "load_comparisons", "tokenize_pairs", "plan_pair_batches", "collate_pairs",
           "pairs_hash", "load_pair_sets"]


@dataclass
class PairExample:
    id: str
    chosen: Example
    rejected: Example
    margin: float  # NaN when the record gives none

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
                           math.nan if rec.margin is None else float(rec.margin))
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


def collate_pairs(pairs: list[PairExample], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Pack the 2B sequences of B pairs into rows of <= max(max_length, longest) tokens; see module docstring."""
    seqs = [e for p in pairs for e in (p.chosen, p.rejected)]
    width = max(max_length, max(len(e.input_ids) for e in seqs))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].input_ids))  # first-fit decreasing
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(seqs[i].input_ids)
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(width - n)
    batch = collate([[seqs[i] for i in row] for row in rows], pad_id, with_seq_ids=True)
    packed_order = torch.tensor([i for row in rows for i in row], dtype=torch.long)  # packed index -> pair order
    seq = batch["seq_ids"]
    batch["seq_ids"] = torch.where(seq >= 0, packed_order[seq.clamp(min=0)], seq)
    last = torch.empty_like(batch["last_index"])
    last[packed_order] = batch["last_index"]
    batch["last_index"] = last
    batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    return batch


def pairs_hash(pairs: list[PairExample]) -> str:
    """Content hash of tokenised pairs: what a cached reference log-prob or a checkpoint must match."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.id, p.chosen.input_ids, p.chosen.labels, p.rejected.input_ids, p.rejected.labels]).encode())
    return h.hexdigest()[:16]


def load_pair_sets(config: Any, chat: ChatFormat) -> tuple[list[PairExample], list[PairExample], PairStats, PairStats]:
    """(train pairs, held-out pairs, their stats) from `config.datasets` / `eval_dataset` (PreferenceSettings)."""
    from ..errors import StageError
    from .data import split_held_out

    if not config.datasets:
        raise StageError("`datasets` is empty; give one or more preference files (datasets: [pairs.jsonl])")
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
        raise StageError(f"no usable training pair (skipped: {stats.skipped or 'none'})")
    return train, eval_pairs, stats, eval_stats
