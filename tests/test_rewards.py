"""Rewards: verifiable rules by hand, prompt loading from files and built-in tasks, config errors."""

from __future__ import annotations

import json

import pytest

from protege.errors import RecordError, StageError
from protege.train.rewards import PromptItem, RewardConfig, contains_gold, final_number, load_prompt_items, make_reward


def test_contains_gold_numbers_and_text():
    assert contains_gold("The total is 1,200 apples.", "1200")
    assert contains_gold("It is 12.0", "12") and not contains_gold("It is 120", "12")
    assert contains_gold("The capital is paris.", "Paris") and not contains_gold("Parisian food", "Paris")
    assert final_number("3 + 4 = 7, so 7.") == 7.0 and final_number("no numbers") is None


def test_rules_by_hand():
    items = [PromptItem("a", [{"role": "user", "content": "2+2?"}], "4")] * 3
    answers, n_tok, fin = ["It is 4.", "1 2 3 4 5", "five"], [4, 9, 2], ["stop", "length", "stop"]
    assert make_reward(RewardConfig(rule="contains_gold"))(items, answers, n_tok, fin) == [1.0, 1.0, 0.0]
    assert make_reward(RewardConfig(rule="final_number"))(items, answers, n_tok, fin) == [1.0, 0.0, 0.0]
    assert make_reward(RewardConfig(rule="ends_within", max_tokens=4))(items, answers, n_tok, fin) == [1.0, 0.0, 1.0]
    assert make_reward(RewardConfig(rule="format", pattern=r"^\d"))(items, answers, n_tok, fin) == [0.0, 1.0, 0.0]
    assert make_reward(RewardConfig(rule="length", length_chars=8))(items, answers, n_tok, fin) == [1.0, 1.0, 0.5]
    with pytest.raises(StageError, match="no gold answer"):
        make_reward(RewardConfig())([PromptItem("x", [])], ["a"], [1], ["stop"])


def test_weighted_terms_sum_and_describe_themselves():
    from protege.train.grpo import GRPOConfig
    from protege.train.rewards import describe_reward

    items = [PromptItem("a", [{"role": "user", "content": "2+2?"}], "4")] * 3
    answers, n_tok, fin = ["It is 4.", "4 5", "4"], [4, 3, 40], ["stop", "stop", "length"]
    cfg = GRPOConfig(model="m", prompts="p", reward=[{"rule": "final_number"},
                                                      {"rule": "ends_within", "max_tokens": 8, "weight": 0.25}])
    assert make_reward(cfg.reward)(items, answers, n_tok, fin) == [1.25, 0.25, 1.0]
    assert describe_reward(cfg.reward) == "rule final_number + 0.25 x rule ends_within (8 tokens)"
    assert make_reward(RewardConfig(rule="final_number", weight=-2.0))(items, answers, n_tok, fin) == [-2.0, 0.0, -2.0]
    with pytest.raises(StageError, match="empty list"):
        make_reward([])


def test_reward_config_errors_say_what_is_missing():
    with pytest.raises(ValueError, match="needs `rm`"):
        RewardConfig(kind="rm")
    with pytest.raises(ValueError, match="safety_rm"):
        RewardConfig(kind="llama2", rm="x")
    with pytest.raises(ValueError, match="pattern"):
        RewardConfig(rule="format")


def test_load_prompt_items(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"id": "q1", "prompt": "hi", "gold": 3}) + "\n\n"
                 + json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
    items = load_prompt_items(str(f))
    assert items[0].gold == "3" and items[0].messages == [{"role": "user", "content": "hi"}]
    assert items[1].messages == [{"role": "user", "content": "a"}]  # the final answer is not part of the prompt
    f.write_text(json.dumps({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}) + "\n")
    assert [m["role"] for m in load_prompt_items(str(f))[0].messages] == ["system", "user"]  # TRL conversational
    wk = load_prompt_items("task:world_knowledge", 2)
    assert wk[0].gold == "Paris" and "France" in wk[0].messages[0]["content"]
    assert load_prompt_items("task:arithmetic", 1)[0].gold == "8"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    with pytest.raises(StageError, match=r"bad.jsonl:2: a prompt record needs"):
        load_prompt_items(str(bad))
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(RecordError, match=r"bad.jsonl:2: bad JSON"):
        load_prompt_items(str(bad))
    with pytest.raises(StageError, match="does not exist"):
        load_prompt_items(str(tmp_path / "missing.jsonl"))


def _tiny_rm(path, seed):
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from tiny import tiny_tokenizer

    tok = tiny_tokenizer("chatml")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    model = AutoModelForSequenceClassification.from_config(cfg)
    with torch.no_grad():
        model.score.weight.normal_(0, 3.0)  # spread the scores so the safety threshold bites
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_reward_model_and_llama2_combination(tmp_path):
    import torch

    from protege.chat import ChatFormat
    from protege.train.rm import llama2_reward, load_reward_model, score

    helpful, safety = _tiny_rm(tmp_path / "h", 0), _tiny_rm(tmp_path / "s", 1)
    items = [PromptItem(str(i), [{"role": "user", "content": f"question {i}"}], meta={"unsafe": i == 0})
             for i in range(6)]
    answers = [f"answer number {i} " * (i + 1) for i in range(6)]
    rm = make_reward(RewardConfig(kind="rm", rm=helpful))(items, answers, [1] * 6, ["stop"] * 6)
    model, tok = load_reward_model(helpful)
    assert rm == pytest.approx(score(model, ChatFormat.from_tokenizer(tok), [it.messages for it in items], answers))
    combined = make_reward(RewardConfig(kind="llama2", rm=helpful, safety_rm=safety))(items, answers, [1] * 6, ["stop"] * 6)
    s_model, s_tok = load_reward_model(safety)
    s = score(s_model, ChatFormat.from_tokenizer(s_tok), [it.messages for it in items], answers)
    want = llama2_reward(torch.tensor(rm), torch.tensor(s), torch.tensor([True] + [False] * 5)).tolist()
    assert combined == pytest.approx(want)
    assert combined[0] == pytest.approx(s[0])  # a prompt tagged unsafe is scored by the safety RM
