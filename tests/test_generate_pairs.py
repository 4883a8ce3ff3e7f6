"""generate pairs: K samples per prompt from a real (tiny) local policy, rule labels, counted skips, resume."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from protege.generate.pairs import PairsConfig, rule_passes, run
from protege.errors import StageError
from protege.records import Comparison, read_records
from protege.teachers import TeacherResponse


def test_rules_hand_cases():
    stop = TeacherResponse("The answer is 14.", {"completion_tokens": 5}, "stop")
    cut = TeacherResponse("and so on and so on", {"completion_tokens": 90}, "length")
    assert rule_passes("ends_turn", stop, 8) and not rule_passes("ends_turn", stop, 4) and not rule_passes("ends_turn", cut, 200)
    assert rule_passes("shorter", cut, 90) and not rule_passes("shorter", cut, 89)
    assert rule_passes("contains_gold", stop, 0, "14") and not rule_passes("contains_gold", stop, 0, "4")
    assert not rule_passes("contains_gold", TeacherResponse("about 0.4 maybe"), 0, "4")
    assert rule_passes("contains_gold", TeacherResponse("Paris, France"), 0, "paris")
    chain = TeacherResponse("12 + 7 = 19 + 7 = 26")
    assert rule_passes("contains_gold", chain, 0, "19") and not rule_passes("final_number", chain, 0, "19")
    assert rule_passes("final_number", stop, 0, "14.0") and not rule_passes("final_number", TeacherResponse("no idea"), 0, "14")
    with pytest.raises(StageError, match="numeric gold"):
        rule_passes("final_number", TeacherResponse("no idea"), 0, "Paris")


def test_pairs_from_tiny_policy_resume_without_resampling(tmp_path, tiny_llama_dir):
    prompts = tmp_path / "p.jsonl"
    with open(prompts, "w") as fh:
        for i in range(6):
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"Say something about {i}."}]}) + "\n")
    cfg = PairsConfig(prompts=str(prompts), out_dir=str(tmp_path / "out"), k=4, max_new_tokens=12, rule="shorter",
                      max_tokens=6, pairs_per_prompt=2, progress=False,
                      policy={"model": str(tiny_llama_dir), "max_batch_size": 8})
    counts = run(cfg)
    samples = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(len(s["answers"]) == 4 for s in samples)
    pairs = list(read_records(tmp_path / "out" / "records.jsonl"))
    assert counts["records"] == len(pairs)
    for p in pairs:  # chosen passes the rule, rejected does not
        assert isinstance(p, Comparison) and p.chosen["content"] != p.rejected["content"]
    assert counts["records"] + sum(counts["skipped"].values()) >= 6
    again = run(cfg)  # every answer comes from the cache: nothing sampled twice
    assert again["policy"]["cache_hits"] == 24 and again["records"] == counts["records"]


def test_pairs_labelled_by_rule_against_a_scripted_policy(tmp_path):
    from fake_openai_server import FakeServer

    prompts = tmp_path / "p.jsonl"
    with open(prompts, "w") as fh:
        for i in range(5):
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"Flip a COIN for {i}"}]}) + "\n")
        fh.write(json.dumps({"messages": [{"role": "user", "content": "Just answer"}]}) + "\n")  # K equal answers
    server = FakeServer()
    try:
        counts = run(PairsConfig(prompts=str(prompts), out_dir=str(tmp_path / "out"), k=4, rule="ends_turn",
                                 max_tokens=64, pairs_per_prompt=4, progress=False,
                                 policy={"backend": "openai", "model": "scripted", "base_url": server.url,
                                         "backoff_base": 0.01}))
    finally:
        server.close()
    pairs = list(read_records(tmp_path / "out" / "records.jsonl"))
    # 5 coin prompts: seeds alternate parity, so 2 stopping x 2 rambling answers = 4 pairs each
    assert counts["records"] == len(pairs) == 20 and counts["skipped"] == {"no_contrast_all_pass": 1}
    assert all(p.chosen["content"].startswith("Heads") and p.rejected["content"].startswith("Tails") for p in pairs)
    assert counts["pass_rate"] == pytest.approx((10 + 4) / 24, abs=1e-4)


def test_pairs_labelled_by_a_reward_model(tmp_path, tiny_llama_dir):
    from fake_openai_server import FakeServer
    from test_train_preference import rm_cfg, write_pairs

    from protege.train.rm import run as train_rm

    train_rm(rm_cfg(tmp_path, tiny_llama_dir, write_pairs(tmp_path / "train.jsonl")))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Flip a COIN for {i}"}]}) + "\n"
                               for i in range(3)))
    server = FakeServer()
    try:
        counts = run(PairsConfig(prompts=str(prompts), out_dir=str(tmp_path / "out"), k=4, label="rm",
                                 rm=str(tmp_path / "rm" / "model"), pairs_per_prompt=2, progress=False,
                                 policy={"backend": "openai", "model": "scripted", "base_url": server.url,
                                         "backoff_base": 0.01}))
    finally:
        server.close()
    samples = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    pairs = list(read_records(tmp_path / "out" / "records.jsonl"))
    assert counts["records"] == len(pairs) == 6  # 4 distinct answers per prompt: best/worst, second/third
    for s, (a, b) in zip(samples, zip(pairs[0::2], pairs[1::2])):
        ranked = sorted(zip(s["scores"], s["answers"]), reverse=True)
        assert a.chosen["content"] == ranked[0][1] and a.rejected["content"] == ranked[-1][1]
        assert a.margin == pytest.approx(ranked[0][0] - ranked[-1][0], abs=1e-3) and a.margin >= b.margin > 0


def test_pairs_labelled_by_a_judge_in_both_orders(tmp_path):
    """The scripted judge answers "Verdict: A" whatever it sees: a pure position bias, so every pair is a
    tie (orders disagree) and nothing is written; a judge that prefers one content labels every duo."""
    from fake_openai_server import FakeServer

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Flip a COIN for {i}"}]}) + "\n"
                               for i in range(3)))
    server = FakeServer()
    try:
        policy = {"backend": "openai", "model": "scripted", "base_url": server.url, "backoff_base": 0.01}
        counts = run(PairsConfig(prompts=str(prompts), out_dir=str(tmp_path / "out"), k=4, label="judge",
                                 progress=False, policy=policy,
                                 judge={"backend": "openai", "model": "always-a", "base_url": server.url,
                                        "backoff_base": 0.01}))
        fair = run(PairsConfig(prompts=str(prompts), out_dir=str(tmp_path / "fair"), k=4, label="judge",
                               pairs_per_prompt=2, progress=False, policy=policy,
                               judge={"backend": "openai", "model": "prefers-heads", "base_url": server.url,
                                      "backoff_base": 0.01}))
    finally:
        server.close()
    assert counts["records"] == 0 and counts["skipped"] == {"judge_tie": 6}
    assert (tmp_path / "out" / "judge").is_dir()  # the judge's own cache: a rerun asks nothing twice
    # seeds alternate parity, so each of the 2 duos per prompt is one Heads and one Tails answer
    pairs = list(read_records(tmp_path / "fair" / "records.jsonl"))
    assert fair["records"] == len(pairs) == 6 and not fair["skipped"]
    assert all("Heads" in p.chosen["content"] and "Tails" in p.rejected["content"] for p in pairs)


def test_pairs_bad_input(tmp_path, tiny_llama_dir):
    from protege.errors import StageError

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "2+2?"}]}) + "\n")
    with pytest.raises(StageError, match="gold"):
        run(PairsConfig(prompts=str(prompts), out_dir=str(tmp_path / "o"), rule="contains_gold", max_new_tokens=4,
                        progress=False, policy={"model": str(tiny_llama_dir)}))
    with pytest.raises(StageError, match="label rm needs"):
        run(PairsConfig(prompts=str(prompts), out_dir=str(tmp_path / "o2"), label="rm", progress=False))
    proc = subprocess.run([sys.executable, "-m", "protege.cli", "generate", "pairs", "--k=1"], capture_output=True, text=True)
    assert proc.returncode != 0 and "k" in proc.stderr


def test_a_local_judge_labels_pairs_by_order_averaged_verdict_probabilities(tmp_path, tiny_llama_dir):
    """Issue 26: `generate pairs --label judge` parsed generated verdicts while `eval judge` calibrates the
    log-prob path; a local judge now labels with the same rule (probabilities averaged over both orders,
    margin p - 0.5), and the default judge is the calibrated built-in one."""
    from protege.evaluate.verdicts import p_first, pairwise_messages, verdict_probs
    from protege.models import DEFAULT_JUDGE
    from protege.teachers import make_teacher

    assert PairsConfig().judge.model == DEFAULT_JUDGE
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Tell me about {i}."}]}) + "\n"
                               for i in range(3)))
    local = {"model": str(tiny_llama_dir), "max_batch_size": 8}
    counts = run(PairsConfig(prompts=str(prompts), out_dir=str(tmp_path / "out"), k=2, label="judge", progress=False,
                             max_new_tokens=8, policy=local, judge=local, judge_tie_margin=0.0))
    pairs = list(read_records(tmp_path / "out" / "records.jsonl"))
    assert counts["records"] == len(pairs) > 0
    judge = make_teacher(PairsConfig(judge=local).judge)
    for p in pairs:  # the written margin is the order-averaged probability the chosen answer is better, less 0.5
        q = [p.prompt[-1]["content"]]
        probs = verdict_probs(judge, [pairwise_messages(q, [p.chosen["content"]], [p.rejected["content"]]),
                                      pairwise_messages(q, [p.rejected["content"]], [p.chosen["content"]])], False)
        assert p_first(*probs) - 0.5 == pytest.approx(p.margin, abs=1e-3) and p.margin > 0
    with pytest.raises(Exception, match="local judge"):
        run(PairsConfig(prompts=str(prompts), out_dir=str(tmp_path / "x"), k=2, label="judge", progress=False,
                        policy=local, judge_verdicts="logprob",
                        judge={"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"}))
