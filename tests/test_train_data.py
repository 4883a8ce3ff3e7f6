"""SFT data: labels from assistant_mask, truncation, packing/grouping plans, collate, packing isolation."""

from __future__ import annotations

import json
import random

import pytest
import torch

from protege.chat import ChatFormat
from protege.records import Conversation, RecordError
from protege.train.data import (Example, collate, length_grouped_rows, load_conversations, pack_rows,
                                plan_micro_batches, tokenize)
from protege.train.losses import IGNORE_INDEX
from protege.train.sft import SFTModule

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus three?"},
        {"role": "assistant", "content": "Five."}, {"role": "user", "content": "And the capital of France?"},
        {"role": "assistant", "content": "Paris."}]


def test_labels_follow_assistant_mask(tiny_llama):
    _, tok = tiny_llama
    chat = ChatFormat.from_tokenizer(tok)
    enc = chat.encode(CONV)
    (ex,) = tokenize([Conversation(CONV)], chat, max_length=512)
    assert ex.input_ids == enc.input_ids
    for t, label in enumerate(ex.labels):
        if t + 1 < len(enc.input_ids) and enc.assistant_mask[t + 1]:
            assert label == enc.input_ids[t + 1]
        else:
            assert label == IGNORE_INDEX
    # both assistant turns are learned, including their end-of-turn token
    learned = tok.decode([x for x in ex.labels if x != IGNORE_INDEX])
    assert "Five." in learned and "Paris." in learned and learned.count("<|im_end|>") == 2
    assert "France" not in learned and "Be brief" not in learned


def test_changing_user_text_does_not_change_what_is_learned(tiny_llama):
    chat = ChatFormat.from_tokenizer(tiny_llama[1])
    other = [dict(m) for m in CONV]
    other[1]["content"] = "Completely different words, and many more of them than before!"
    a, b = tokenize([Conversation(CONV), Conversation(other)], chat, max_length=512)
    assert [x for x in a.labels if x != IGNORE_INDEX] == [x for x in b.labels if x != IGNORE_INDEX]
    assert a.n_labels == b.n_labels


def test_train_on_all_and_truncation(tiny_llama):
    chat = ChatFormat.from_tokenizer(tiny_llama[1])
    (full,) = tokenize([Conversation(CONV)], chat, 512, train_on_all=True)
    assert full.n_labels == len(full.input_ids) - 1  # every next token, none past the end
    from protege.train.data import TokenStats

    stats = TokenStats()
    short = tokenize([Conversation(CONV)], chat, max_length=8, stats=stats)
    assert short == [] and stats.truncated == 1 and stats.dropped_no_labels == 1


def test_pack_rows_uses_every_example_once_and_fits():
    rng = random.Random(0)
    lengths = [rng.randint(5, 100) for _ in range(300)]
    rows = pack_rows(lengths, 128, random.Random(1))
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert sum(lengths) / (len(rows) * 128) > 0.9  # little padding


def test_length_grouped_rows_reduce_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(256)]
    rows = length_grouped_rows(lengths, 8, random.Random(0))
    assert sorted(r[0] for r in rows) == list(range(256))
    batches = [[lengths[r[0]] for r in rows[b:b + 8]] for b in range(0, 256, 8)]
    padded = sum(max(b) * len(b) for b in batches)
    naive = sum(max(lengths[b:b + 8]) * 8 for b in range(0, 256, 8))
    assert padded < 0.8 * naive


def test_progressive_plan_keeps_dataset_order():
    a = [Example([1] * n, [2] * n) for n in (3, 4, 5, 6)]
    b = [Example([1] * n, [2] * n) for n in (7, 8)]
    plan = plan_micro_batches([a, b], batch_size=2, max_length=8, packing=False, epochs=2, seed=0)
    sources = [row[0][0] for mb in plan for row in mb]
    assert sources == [0] * 8 + [1] * 4
    assert plan == plan_micro_batches([a, b], 2, 8, False, 2, seed=0)  # deterministic


def test_collate_restarts_positions_and_pads():
    rows = [[Example([5, 6, 7], [6, 7, IGNORE_INDEX]), Example([8, 9], [9, IGNORE_INDEX])], [Example([4], [IGNORE_INDEX])]]
    b = collate(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 0, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert b["labels"][1].tolist() == [IGNORE_INDEX] * 5


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_packed_loss_equals_one_by_one(arch, tiny_llama, tiny_gemma):
    """Attention cannot cross conversations: a packed row gives each conversation's own loss."""
    model, tok = tiny_llama if arch == "llama" else tiny_gemma
    chat = ChatFormat.from_tokenizer(tok)
    convs = [Conversation(CONV), Conversation([{"role": "user", "content": "Write a short poem about the sea."},
                                               {"role": "assistant", "content": "The sea is wide and blue."}]),
             Conversation([{"role": "user", "content": "Translate hello to French."},
                           {"role": "assistant", "content": "Bonjour."}])]
    examples = tokenize(convs, chat, 512)
    module = SFTModule(model)
    with torch.no_grad():
        packed = collate([examples], tok.pad_token_id)
        packed_sum = module(**packed, normalizer=1.0)
        alone = sum(module(**collate([[e]], tok.pad_token_id), normalizer=1.0) for e in examples)
        # a conversation shifted right behind others must see the same context as alone: compare also
        # against a batch of unpacked rows with padding (the length-grouped path)
        padded_sum = module(**collate([[e] for e in examples], tok.pad_token_id), normalizer=1.0)
    assert packed["position_ids"][0].tolist().count(0) == 3
    assert packed_sum.item() == pytest.approx(alone.item(), rel=1e-5)
    assert padded_sum.item() == pytest.approx(alone.item(), rel=1e-5)


def test_load_conversations_bad_inputs(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}],
                               "chosen": {"role": "assistant", "content": "a"},
                               "rejected": {"role": "assistant", "content": "b"}}) + "\n")
    with pytest.raises(RecordError, match="Comparison"):
        load_conversations(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(RecordError, match="no conversations"):
        load_conversations(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n')
    with pytest.raises(RecordError, match=":2"):
        load_conversations(broken)
    with pytest.raises(FileNotFoundError):
        load_conversations(tmp_path / "missing.jsonl")
