"""SFT data: conversations -> (input_ids, labels) examples -> packed or length-grouped micro-batches.

Labels are stored already shifted: `labels[t]` is the token the model must predict after
position t, or IGNORE_INDEX. Shifting per conversation (before packing) means the last
token of one conversation never learns to predict the first token of the next.

The whole order of micro-batches for a run (every epoch, every dataset of a progressive
run) is planned up front from the seed. A micro-batch is then addressed by its index,
which makes resuming exact (skip the first k) and sharding across data-parallel ranks
trivial (rank r takes the micro-batches of a step with index % world == r).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..chat import ChatFormat
from ..formats import iter_source
from ..records import Conversation, RecordError
from .losses import IGNORE_INDEX

__all__ = ["Example", "TokenStats", "split_held_out", "tokenize", "load_conversations", "pack_rows", "length_grouped_rows",
           "plan_micro_batches", "collate", "first_fit_decreasing"]


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # shifted; IGNORE_INDEX where nothing is learned

    @property
    def n_labels(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class TokenStats:
    conversations: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0
    tokens: int = 0
    label_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def tokenize(conversations: list[Conversation], chat: ChatFormat, max_length: int, train_on_all: bool = False,
             stats: TokenStats | None = None) -> list[Example]:
    """Encode conversations with the model's chat format; truncate to `max_length`; drop label-less ones."""
    stats = stats if stats is not None else TokenStats()
    out = []
    for conv in conversations:
        enc = chat.encode(conv.messages, train_on_all=train_on_all)
        ids, mask = enc.input_ids, enc.assistant_mask
        stats.conversations += 1
        if len(ids) > max_length:
            # Keep the start: the system prompt and first turns frame everything after them.
            ids, mask = ids[:max_length], mask[:max_length]
            stats.truncated += 1
        labels = [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
        ex = Example(ids, labels)
        if ex.n_labels == 0:
            stats.dropped_no_labels += 1
            continue
        stats.tokens += len(ids)
        stats.label_tokens += ex.n_labels
        out.append(ex)
    return out


def split_held_out(items: list, fraction: float, cap: int, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded random `fraction` of `items` (at most `cap`) held out for eval."""
    n_eval = min(cap, int(len(items) * fraction))
    if n_eval == 0:
        return items, []
    idx = list(range(len(items)))
    random.Random(f"{seed}/eval").shuffle(idx)
    held = set(idx[:n_eval])
    return [c for i, c in enumerate(items) if i not in held], [c for i, c in enumerate(items) if i in held]


def load_conversations(path: str | Path) -> list[Conversation]:
    """Conversations from a JSONL/JSON file (protege, ShareGPT, OpenAI or Alpaca shape) or a `datasets` source."""
    convs = []
    for i, rec in enumerate(iter_source(path)):
        if not isinstance(rec, Conversation):
            raise RecordError(f"record {i + 1} is a {type(rec).__name__}, SFT needs conversations", str(path))
        if not any(m["role"] == "assistant" for m in rec.messages):
            raise RecordError(f"conversation {rec.id} has no assistant message to learn from", str(path))
        convs.append(rec)
    if not convs:
        raise RecordError("no conversations in this dataset", str(path))
    return convs


def first_fit_decreasing(items: list[int], lengths: list[int], width: int) -> list[list[int]]:
    """Bins of `items` (indices into `lengths`), longest first, each into the first bin with room (<= width)."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(items, key=lambda i: -lengths[i]):
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(width - lengths[i])
    return bins


def pack_rows(lengths: list[int], max_length: int, rng: random.Random, window: int = 2048) -> list[list[int]]:
    """Bins of example indices, each summing to <= max_length (first-fit decreasing in shuffled windows).

    Windows keep the shuffle (so a bin does not hold only the longest examples of the whole
    set) while first-fit decreasing leaves little padding.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows: list[list[int]] = []
    for w in range(0, len(order), window):
        rows.extend(first_fit_decreasing(order[w:w + window], lengths, max_length))
    rng.shuffle(rows)
    return rows


def length_grouped_rows(lengths: list[int], batch_size: int, rng: random.Random, group: int = 64) -> list[list[int]]:
    """One example per row, ordered so each micro-batch holds similar lengths (less padding).

    Sorting inside shuffled mega-batches of `group` micro-batches (as HF's LengthGroupedSampler)
    keeps randomness; the micro-batches are shuffled again so long ones are not all first.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * group
    batches: list[list[int]] = []
    for m in range(0, len(order), mega):
        chunk = sorted(order[m:m + mega], key=lambda i: -lengths[i])
        batches.extend(chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return [[i] for batch in batches for i in batch]


def plan_micro_batches(datasets: list[list[Example]], batch_size: int, max_length: int, packing: bool,
                       epochs: int, seed: int) -> list[list[list[tuple[int, int]]]]:
    """Every micro-batch of the run, in order: micro-batch -> rows -> (dataset index, example index).

    Datasets are trained one after the other (Orca's progressive learning), each for `epochs`.
    """
    plan = []
    for d, examples in enumerate(datasets):
        lengths = [len(e.input_ids) for e in examples]
        for epoch in range(epochs):
            rng = random.Random(f"{seed}/{d}/{epoch}")
            rows = (pack_rows(lengths, max_length, rng) if packing
                    else length_grouped_rows(lengths, batch_size, rng))
            for b in range(0, len(rows), batch_size):
                plan.append([[(d, i) for i in row] for row in rows[b:b + batch_size]])
    return plan


def collate(rows: list[list[Example]], pad_id: int, with_seq_ids: bool = False) -> dict[str, torch.Tensor]:
    """Rows of examples -> right-padded `input_ids`, `position_ids`, `labels` (B, T).

    Positions restart at 0 for every conversation of a packed row; transformers (>= 4.54)
    turns restarting positions with `attention_mask=None` into a block-diagonal causal mask,
    so attention cannot cross conversations. Right padding needs no mask at all under causal
    attention: real tokens never look right, and padded positions carry no label.

    `with_seq_ids` adds what per-sequence losses (RM, DPO) need: `seq_ids` (B, T), the index of
    each position's example in row-major order (-1 on padding), and `last_index` (n_examples,),
    the flat position (row * T + column) of each example's last token.
    """
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seq = torch.full((len(rows), width), -1, dtype=torch.long)
    last: list[int] = []
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.input_ids)
            ids[r, at:at + n] = torch.tensor(e.input_ids)
            labels[r, at:at + n] = torch.tensor(e.labels)
            pos[r, at:at + n] = torch.arange(n)
            seq[r, at:at + n] = len(last)
            last.append(r * width + at + n - 1)
            at += n
        # Padding continues the last conversation's positions, so an unpacked batch keeps plain
        # increasing positions and transformers keeps its fast causal path.
        last_pos = pos[r, at - 1] if at else -1
        pos[r, at:] = torch.arange(1, width - at + 1) + last_pos
    out = {"input_ids": ids, "position_ids": pos, "labels": labels}
    if with_seq_ids:
        out.update(seq_ids=seq, last_index=torch.tensor(last, dtype=torch.long))
    return out
