"""PPO on a tiny random model: the controller and layout helpers by hand, reward rises, the value head
learns a constant reward, KL starts at 0, and a killed run resumes to the same weights."""

from __future__ import annotations

import json

import pytest
import torch

from protege.train.ppo import PPOConfig, _padded, adaptive_beta, run


def test_adaptive_beta_by_hand():
    assert adaptive_beta(0.1, kl=6.0, target=6.0, n=16, horizon=160) == pytest.approx(0.1)
    assert adaptive_beta(0.1, kl=12.0, target=6.0, n=16, horizon=160) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # clipped
    assert adaptive_beta(0.1, kl=5.4, target=6.0, n=16, horizon=160) == pytest.approx(0.1 * (1 - 0.1 * 0.1))


def test_padded_layout():
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    seq = torch.tensor([0, 0, 0, 1, 1])
    out, mask = _padded(vals, seq, 2)
    assert out.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def _cfg(tmp_path, model_dir, **kw):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"say something {i}"}) + "\n" for i in range(24)))
    base = dict(model=str(model_dir), prompts=str(prompts), out_dir=str(tmp_path / "ppo"),
                reward={"kind": "rule", "rule": "format", "pattern": r"^ "}, max_new_tokens=3, rollout_prompts=16,
                minibatches=2, ppo_epochs=2, batches=6, learning_rate=1e-2, eval_every=12, save_every=4,
                tensorboard=False, lora={"r": 8, "alpha": 16, "dropout": 0.0, "trainable_tokens": "none"})
    base.update(kw)
    return PPOConfig(**base)


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_ppo_trains_and_its_value_head_learns(tmp_path, tiny_policy_dir):
    from safetensors.torch import load_file

    s = run(_cfg(tmp_path, tiny_policy_dir))
    out = tmp_path / "ppo"
    rows = [r for r in _rows(out / "metrics.jsonl") if "reward" in r]
    assert len(rows) == 6 * 2 * 2
    first, last = rows[0]["reward"], sum(r["reward"] for r in rows[-4:]) / 4
    assert last > first + 0.2, [round(r["reward"], 2) for r in rows]
    watch = json.loads((out / "overoptimisation.json").read_text())
    assert watch["history"][0]["kl"] == pytest.approx(0.0, abs=1e-6) and watch["history"][-1]["kl"] > 0
    assert (out / "adapter" / "value_head.safetensors").exists() and (out / "best" / "value_head.safetensors").exists()
    lora_b = [v for k, v in load_file(str(out / "adapter" / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert any(v.abs().max() > 0 for v in lora_b)
    assert s["rollout_batches"] == 6 and s["reused_batches"] == 0


def test_ppo_value_head_learns_a_constant_reward(tmp_path, tiny_policy_dir):
    run(_cfg(tmp_path, tiny_policy_dir, reward={"kind": "rule", "rule": "format", "pattern": "^"},  # always 1
             beta=0.0, learning_rate=5e-2, eval_every=0, batches=5))
    rows = [r for r in _rows(tmp_path / "ppo" / "metrics.jsonl") if "value_loss" in r]
    assert rows[0]["reward"] == 1.0
    assert rows[-1]["value_loss"] < 0.3 * rows[0]["value_loss"], [round(r["value_loss"], 4) for r in rows]


def test_ppo_resume_reaches_the_same_weights(tmp_path, tiny_policy_dir):
    from conftest import assert_same_tensors

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run(_cfg(tmp_path / "a", tiny_policy_dir, batches=2, eval_every=0, save_every=2))
    cut = _cfg(tmp_path / "b", tiny_policy_dir, batches=2, eval_every=0, save_every=2)
    assert run(cut, stop_after_steps=2)["stopped_at_step"] == 2  # mid-batch: its targets are on disk
    again = run(cut)
    assert again["resumed_from_step"] == 2 and again["reused_batches"] == 1
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        assert_same_tensors(tmp_path / "a" / "ppo" / "adapter" / name, tmp_path / "b" / "ppo" / "adapter" / name)


def test_ppo_splits_each_minibatch_over_grad_accum_and_processes(tmp_path, tiny_policy_dir):
    """One optimizer step is one minibatch, however it is split: grad_accum 2, and two DDP processes (gloo,
    through recipes/accelerate/ddp.yaml), give the loss curve and the weights of one process."""
    from conftest import assert_same_tensors, launch_ddp

    kw = dict(batches=2, eval_every=0, save_every=0, beta=0.05)
    for name, accum in (("one", 1), ("accum", 2)):
        (tmp_path / name).mkdir()
        run(_cfg(tmp_path / name, tiny_policy_dir, grad_accum=accum, **kw))
    curves = {n: [r[k] for r in _rows(tmp_path / n / "ppo" / "metrics.jsonl") if "loss" in r for k in ("loss", "reward")]
              for n in ("one", "accum")}
    assert len(curves["one"]) == 2 * 2 * 2 * 2
    assert curves["accum"] == pytest.approx(curves["one"], rel=1e-4, abs=1e-6)
    (tmp_path / "ddp").mkdir()
    log = launch_ddp("ppo", _cfg(tmp_path / "ddp", tiny_policy_dir, **kw), tmp_path / "ddp.yaml")
    assert "steps on 2 process(es)" in log
    ddp_curve = [r[k] for r in _rows(tmp_path / "ddp" / "ppo" / "metrics.jsonl") if "loss" in r for k in ("loss", "reward")]
    assert ddp_curve == pytest.approx(curves["one"], rel=1e-4, abs=1e-6)
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        assert_same_tensors(tmp_path / "one" / "ppo" / "adapter" / name, tmp_path / "ddp" / "ppo" / "adapter" / name,
                            atol=1e-5)
