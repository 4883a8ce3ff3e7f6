"""GRPO on a tiny random model: reward rises, LoRA weights move, frozen ones do not, KL starts at 0,
rollouts are cached and a killed run resumes to the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from protege.train.grpo import GRPOConfig, grpo_objective, run


def _prompts(path, n=24):
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"p{i}", "prompt": f"say something {i}", "gold": "7"}) + "\n")
    return path


def _config(tmp_path, model_dir, **kw):
    base = dict(model=str(model_dir), prompts=str(_prompts(tmp_path / "prompts.jsonl")), out_dir=str(tmp_path / "grpo"),
                reward={"kind": "rule", "rule": "format", "pattern": r"^ "},  # the answer opens with a space token
                group_size=4, batch_size=4, max_new_tokens=3, max_steps=12, learning_rate=1e-2, eval_every=6,
                eval_fraction=0.25, tensorboard=False, lora={"r": 8, "alpha": 16, "dropout": 0.0,
                                                             "trainable_tokens": "none"})
    base.update(kw)
    return GRPOConfig(**base)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_grpo_objective_by_hand():
    # two answers of lengths 2 and 1; advantages +1, -1; ratio 1 -> loss = -(1*2/2) + (1*1/1) = 0, gradient -A/|o|
    lp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    seq = torch.tensor([0, 0, 1])
    loss, kl = grpo_objective(lp, None, seq, torch.tensor([1.0, -1.0]), clip=0.2, beta=0.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0)
    assert lp.grad.tolist() == pytest.approx([-0.5, -0.5, 1.0])
    assert kl.tolist() == [0.0, 0.0]
    # with a reference and beta: per-answer k3 KL, and beta * mean-over-answer k3 added to the loss
    lp2 = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.0, -0.5])
    loss2, kl2 = grpo_objective(lp2, ref, seq, torch.tensor([0.0, 0.0]), clip=0.2, beta=0.5)
    k3 = torch.exp(torch.tensor(1.0)) - 1.0 - 1.0
    assert kl2.tolist() == pytest.approx([k3.item(), 0.0])
    assert loss2.item() == pytest.approx(0.5 * k3.item() / 2)


def test_grpo_trains_on_a_rule_reward(tmp_path, tiny_policy_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = _config(tmp_path, tiny_policy_dir)
    summary = run(cfg)
    out = tmp_path / "grpo"
    rows = [r for r in _rows(out / "metrics.jsonl") if "reward" in r]
    # GRPO's loss at ratio 1 is identically ~0 (advantages are centred per group): what must rise is the reward.
    first, last = sum(r["reward"] for r in rows[:2]) / 2, sum(r["reward"] for r in rows[-4:]) / 4
    assert last > first + 0.25, [r["reward"] for r in rows]
    watch = json.loads((out / "overoptimisation.json").read_text())
    assert [h["step"] for h in watch["history"]] == [0, 6, 12]
    assert watch["history"][0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference at step 0
    assert watch["history"][-1]["kl"] > 0
    assert (out / "best" / "adapter_config.json").exists() and (out / "overoptimisation.png").exists()
    assert summary["rollouts"] == 12 * 16 and summary["reused"] == 0
    assert len(list((out / "rollouts").glob("mb-*.json"))) == 12
    # LoRA matrices moved; the base weights did not
    base = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_policy_dir), str(out / "adapter"))
    lora_b = {k: v for k, v in load_file(str(out / "adapter" / "adapter_model.safetensors")).items() if "lora_B" in k}
    assert lora_b and any(v.abs().max() > 0 for v in lora_b.values())
    for name, p in trained.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, dict(base.named_parameters())[name.replace(".base_layer", "")])


def test_grpo_resume_reuses_rollouts_and_reaches_the_same_weights(tmp_path, tiny_policy_dir):
    from conftest import assert_same_tensors

    for d in "abc":
        (tmp_path / d).mkdir()
    whole = _config(tmp_path / "a", tiny_policy_dir, max_steps=4, eval_every=0, save_every=2)
    run(whole)
    cut = _config(tmp_path / "b", tiny_policy_dir, max_steps=4, eval_every=0, save_every=2)
    assert run(cut, stop_after_steps=2)["stopped_at_step"] == 2
    # a kill mid-step 3: its rollouts were written before the loss, the checkpoint is still step 2
    resumed = run(cut)
    assert resumed["resumed_from_step"] == 2 and resumed["reused"] == 0
    adapter = Path("grpo") / "adapter" / "adapter_model.safetensors"
    assert_same_tensors(tmp_path / "a" / adapter, tmp_path / "b" / adapter)
    # kill after step 3's rollouts but before its update: the rerun decodes nothing again for step 3
    third = _config(tmp_path / "c", tiny_policy_dir, max_steps=4, eval_every=0, save_every=2)
    run(third, stop_after_steps=2)
    import shutil

    shutil.copy(tmp_path / "b" / "grpo" / "rollouts" / "mb-000002.json", tmp_path / "c" / "grpo" / "rollouts")
    again = run(third)
    assert again["reused"] == 16
    assert_same_tensors(tmp_path / "a" / adapter, tmp_path / "c" / adapter)


def test_overoptimisation_watch_by_hand(tmp_path):
    from protege.train.rl import OverOptimisationWatch

    saved, logs = [], []
    watch = OverOptimisationWatch(tmp_path, lambda p: saved.append(p), logs.append)
    for step, proxy, gold in [(0, 0.1, 0.5), (1, 0.2, 0.6), (2, 0.3, 0.55), (3, 0.4, 0.5)]:
        watch.record(step, proxy, gold, kl=float(step))
    assert [w["step"] for w in watch.warnings] == [3] and "gold fell 0.600 -> 0.500" in watch.warnings[0]["message"]
    assert watch.best["step"] == 1 and len(saved) == 2  # step 0, then the better step 1
    # a resumed run that redoes step 3 replaces it instead of duplicating it
    watch.record(3, 0.4, 0.7, kl=3.0)
    assert [h["step"] for h in watch.history] == [0, 1, 2, 3] and watch.warnings == [] and watch.best["step"] == 3
    assert OverOptimisationWatch(tmp_path, lambda p: None, print).history == watch.history  # persisted


def test_a_length_rewarding_proxy_fires_the_warning_while_gold_falls(tmp_path, tiny_policy_dir):
    """The deliberately flawed proxy rewards length; the gold rule wants short answers. GRPO climbs the
    proxy, gold falls, and the run says so (and keeps the best model by gold)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say something {i}"}) + "\n" for i in range(48)))
    cfg = GRPOConfig(model=str(tiny_policy_dir), prompts=str(prompts), out_dir=str(tmp_path / "o"),
                     reward={"kind": "rule", "rule": "length", "length_chars": 24},
                     gold={"kind": "rule", "rule": "format", "pattern": r"^.{0,10}$"},
                     group_size=4, batch_size=4, max_new_tokens=4, max_steps=10, learning_rate=4e-3, eval_every=1,
                     eval_fraction=0.34, tensorboard=False,
                     lora={"r": 8, "alpha": 16, "dropout": 0.0, "trainable_tokens": "none"})
    s = run(cfg)
    hist = json.loads((tmp_path / "o" / "overoptimisation.json").read_text())["history"]
    assert hist[-1]["proxy"] > hist[0]["proxy"] + 0.1 and hist[-1]["gold"] < hist[0]["gold"] - 0.3
    assert s["warnings"] and "over-optimisation" in s["warnings"][0]
    assert s["best"]["gold"] == max(h["gold"] for h in hist)
    assert (tmp_path / "o" / "best" / "adapter_config.json").exists()
    # the report shows the run: proxy and gold start -> end, the warning count, the sqrt(KL) figure
    from protege.report import ReportConfig
    from protege.report import run as report

    out = report(ReportConfig(inputs=[str(tmp_path / "o")], output=str(tmp_path / "rep" / "report.html")))
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "Reward optimisation" in page and "over-optimisation: gold fell" in page and "data:image/png" in page
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"| o | grpo | {hist[0]['proxy']:.3f} → {hist[-1]['proxy']:.3f}" in md and out["models"] == 0


def test_merged_rollouts_decode_the_same_and_restore_the_weights_exactly(tiny_policy_dir):
    from protege.chat import ChatFormat
    from protege.engine import Engine
    from protege.models import load
    from protege.train.model import prepare_model
    from protege.train.rewards import PromptItem
    from protege.config import Sampling
    from protege.train.rl import reference_off, sample_rollouts
    from protege.train.rollout_engines import ProtegeRollouts, merged_adapters
    from protege.train.settings import TrainSettings

    model, tok = load(str(tiny_policy_dir), device="cpu")
    chat = ChatFormat.from_tokenizer(tok)
    model = prepare_model(TrainSettings(lora={"r": 8, "trainable_tokens": "none"}), model, chat)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = Engine(model, tok, chat)
    plain_engine, merging_engine = ProtegeRollouts(engine, merge=False), ProtegeRollouts(engine, merge=True)
    items = [PromptItem(str(i), [{"role": "user", "content": f"hello {i}"}]) for i in range(3)]
    sampled = Sampling(max_new_tokens=5, temperature=1.0)
    plain = sample_rollouts(plain_engine, chat, items, [0, 1, 2], 2, sampled, 0, 0, 64)
    merged = sample_rollouts(merging_engine, chat, items, [0, 1, 2], 2, sampled, 0, 0, 64)
    assert [r.answer_ids for r in plain] == [r.answer_ids for r in merged]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    with reference_off(model), merged_adapters(model):  # disabled adapters are never merged in
        ref = sample_rollouts(merging_engine, chat, items, [0], 1, Sampling(max_new_tokens=5), 0, 0, 64)
    with reference_off(model):
        ref2 = sample_rollouts(plain_engine, chat, items, [0], 1, Sampling(max_new_tokens=5), 0, 0, 64)
    assert ref[0].answer_ids == ref2[0].answer_ids


def test_answers_with_zero_advantage_add_nothing_so_skipping_them_is_exact():
    lp = torch.tensor([-1.0, -2.0, -0.5, -0.7, -0.1], requires_grad=True)
    seq = torch.tensor([0, 0, 1, 2, 2])
    adv = torch.tensor([1.0, 0.0, -1.0])  # answer 1 has advantage 0
    full, _ = grpo_objective(lp, None, seq, adv, clip=0.2, beta=0.0)
    full.backward()
    kept_lp = lp.detach()[[0, 1, 3, 4]].clone().requires_grad_(True)
    part, _ = grpo_objective(kept_lp, None, torch.tensor([0, 0, 1, 1]), adv[[0, 2]], clip=0.2, beta=0.0)
    part.backward()
    assert part.item() == pytest.approx(full.item())
    assert kept_lp.grad.tolist() == pytest.approx(lp.grad[[0, 1, 3, 4]].tolist()) and lp.grad[2] == 0


def test_merged_weights_are_the_policy_in_hf_names_trainable_token_rows_included():
    """What a vLLM rollout engine is sent after each step: loaded into a fresh copy of the base (strictly: every
    name an HF checkpoint name), it computes the LoRA + trainable-token policy's logits."""
    from tiny import tiny_model

    from protege.chat import ChatFormat
    from protege.train.model import prepare_model
    from protege.train.rollout_engines import merged_adapters, merged_weights
    from protege.train.settings import TrainSettings

    model, tok = tiny_model("llama", seed=0)
    policy = prepare_model(TrainSettings(lora={"r": 4}), model, ChatFormat.from_tokenizer(tok)).eval()
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n or "trainable_tokens_delta" in n:
                p.normal_(0, 0.3)
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        want = policy(input_ids=x).logits
        with merged_adapters(policy):
            weights = {k: v.clone() for k, v in merged_weights(policy, include_embeddings=True).items()}
        fresh, _ = tiny_model("llama", seed=0)
        assert (fresh(input_ids=x).logits - want).abs().max() > 0.1  # the policy did move
        fresh.load_state_dict(weights, strict=True)
        torch.testing.assert_close(fresh(input_ids=x).logits, want, rtol=0, atol=1e-4)
    assert "model.embed_tokens.weight" not in merged_weights(policy, include_embeddings=False)


def test_grpo_under_ddp_equals_one_process_with_the_same_global_batch(tmp_path, tiny_policy_dir):
    """Two DDP processes (gloo, recipes/accelerate/ddp.yaml): each rank decodes and scores its own prompt
    groups, and the step's update equals one process's with grad_accum 2 (same seeded rollouts)."""
    from conftest import assert_same_tensors, launch_ddp

    kw = dict(max_steps=3, eval_every=0, save_every=0)
    (tmp_path / "one").mkdir()
    run(_config(tmp_path / "one", tiny_policy_dir, grad_accum=2, **kw))
    (tmp_path / "ddp").mkdir()
    log = launch_ddp("grpo", _config(tmp_path / "ddp", tiny_policy_dir, **kw), tmp_path / "ddp.yaml")
    assert "answers on 2 process(es)" in log
    curves = {n: [r[k] for r in _rows(tmp_path / n / "grpo" / "metrics.jsonl") if "loss" in r for k in ("loss", "reward")]
              for n in ("one", "ddp")}
    assert len(curves["one"]) == 3 * 2
    assert curves["ddp"] == pytest.approx(curves["one"], rel=1e-4, abs=1e-6)
    assert_same_tensors(tmp_path / "one" / "grpo" / "adapter" / "adapter_model.safetensors",
                        tmp_path / "ddp" / "grpo" / "adapter" / "adapter_model.safetensors", atol=1e-5)
