"""RL loss pieces against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from protege.train.rl_losses import (best_of_n_kl, clipped_policy_loss, clipped_value_loss, gae, group_advantages,
                                     kl_per_token, kl_shaped_rewards, whiten)


def test_kl_estimators_by_hand_and_zero_when_equal():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert kl_per_token(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    # k3 = e^(ref-logp) - (ref-logp) - 1
    assert kl_per_token(logp, ref, "k3").tolist() == pytest.approx([math.exp(-0.5) + 0.5 - 1, math.exp(1) - 1 - 1])
    assert kl_per_token(logp, logp, "k3").abs().max() == 0
    with pytest.raises(ValueError, match="k1 or k3"):
        kl_per_token(logp, ref, "k2")


def test_kl_shaped_rewards_put_the_score_on_the_last_answer_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    r = kl_shaped_rewards(torch.tensor([2.0, -1.0]), kl, mask, beta=0.1)
    assert r.tolist() == [pytest.approx([-0.01, -0.02, 2.0 - 0.03]), pytest.approx([-1.0 - 0.05, 0.0, 0.0])]


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    d2 = 1.0 - 0.7
    d1 = 0.0 + 0.7 - 0.6
    d0 = 0.0 + 0.6 - 0.5
    a2, a1 = d2, d1 + 0.5 * d2
    a0 = d0 + 0.5 * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2])
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.6, a2 + 0.7])
    # lambda 1, gamma 1: the advantage is the final reward minus the value (Monte Carlo)
    adv1, _ = gae(rewards, values, mask, 1.0, 1.0)
    assert adv1[0].tolist() == pytest.approx([0.5, 0.4, 0.3])
    # padding carries nothing: a padded row equals the unpadded one on its valid tokens
    padded, _ = gae(torch.tensor([[0.0, 0.0, 1.0, 9.0]]), torch.tensor([[0.5, 0.6, 0.7, 9.0]]),
                    torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 1.0, 0.5)
    assert padded[0, :3].tolist() == pytest.approx([a0, a1, a2]) and padded[0, 3] == 0


def test_whiten_over_valid_tokens_only():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    assert w.tolist()[0] == pytest.approx([-1.0, 1.0, 0.0], abs=1e-4)


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, frac = clipped_policy_loss(logp, old, adv, mask, clip=0.2)
    # A>0, r=1.5 -> min(1.5, 1.2) = 1.2; A>0, r=0.5 -> min(0.5, 0.8) = 0.5; A<0, r=1.1 -> min(-2.2, -2.2) = -2.2
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 2.2))
    assert frac.item() == pytest.approx(1 / 3)
    # ratio 1 (one update per rollout): the loss is -sum(A) and its gradient -A
    lp = torch.zeros(1, 3, requires_grad=True)
    loss, _ = clipped_policy_loss(lp, old, adv, mask)
    loss.backward()
    assert lp.grad.tolist()[0] == pytest.approx([-1.0, -1.0, 2.0])


def test_clipped_value_loss_by_hand():
    v, old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0]])
    # token 0: (1-2)^2 = 1, clipped V = 0.2 -> (0.2-2)^2 = 3.24 -> max 3.24; token 1: 1 and 1 -> 1
    assert clipped_value_loss(v, old, ret, mask, clip=0.2).item() == pytest.approx(0.5 * (3.24 + 1.0))
    assert clipped_value_loss(v, old, ret, mask, clip=None).item() == pytest.approx(0.5 * (1.0 + 1.0))


def test_group_advantages_grpo_rloo_and_flat_groups():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = group_advantages(r, 4)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()
    assert a[:4].tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 1 + [-0.5 / (std + 1e-4), 0.5 / (std + 1e-4)])
    assert a[4:].abs().max() == 0  # all equal: nothing to learn
    assert group_advantages(r, 4, scale=False)[:4].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])
    loo = group_advantages(r, 4, baseline="rloo")
    assert loo[0].item() == pytest.approx(1.0 - 1 / 3) and loo[1].item() == pytest.approx(0.0 - 2 / 3)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def test_best_of_n_kl():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(8) == pytest.approx(math.log(8) - 7 / 8)
    with pytest.raises(ValueError):
        best_of_n_kl(0)


def test_truncated_importance_weights_by_hand():
    from protege.train.rl_losses import truncated_is_weights

    logp = torch.tensor([-1.0, -1.0, -0.5, -2.0], requires_grad=True)
    sample = torch.tensor([-1.0, -1.5, -3.0, math.nan])  # equal; trainer likelier; far likelier (cap); unknown
    w = truncated_is_weights(logp, sample, cap=2.0)
    assert w.tolist() == pytest.approx([1.0, math.exp(0.5), 2.0, 1.0])
    assert not w.requires_grad  # a weight on the gradient, not a path for it
    assert truncated_is_weights(logp, torch.tensor([-0.5, -0.5, -0.5, -0.5]), 2.0)[0] == pytest.approx(math.exp(-0.5))


def test_sampler_correction_weights_only_rollouts_another_engine_sampled():
    from protege.train.rl import Rollout, sampler_correction
    from protege.train.rollout_engines import RolloutEngineConfig

    ours = [Rollout(0, [1], [5, 6], "", "stop"), Rollout(0, [1], [7], "", "stop")]
    lp = torch.tensor([-1.0, -2.0, -0.5])
    assert sampler_correction(lp, ours, RolloutEngineConfig()) == (None, {})
    vllm = [Rollout(0, [1], [5, 6], "", "stop", sample_logps=[-1.1, -2.0]), Rollout(0, [1], [7], "", "stop")]
    w, stats = sampler_correction(lp, vllm, RolloutEngineConfig(is_cap=1.05))
    assert w.tolist() == pytest.approx([1.05, 1.0, 1.0])  # exp(0.1) = 1.105 truncated; equal; not vLLM's: 1
    assert stats["logp_mismatch"] == pytest.approx(0.05)  # |0.1| and 0 over the two tokens vLLM sampled
    assert stats["is_truncated"] == pytest.approx(0.5)
    w, stats = sampler_correction(lp, vllm, RolloutEngineConfig(is_correction="none"))
    assert w is None and set(stats) == {"logp_mismatch"}


def test_importance_weights_scale_each_token_s_policy_gradient():
    from protege.train.grpo import grpo_objective

    seq = torch.tensor([0, 0, 1])
    adv = torch.tensor([1.0, -1.0])
    grads = []
    for w in (None, torch.ones(3), torch.tensor([0.5, 1.0, 2.0])):
        lp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
        grpo_objective(lp, None, seq, adv, clip=0.2, beta=0.0, is_weights=w)[0].backward()
        grads.append(lp.grad.tolist())
    assert grads[0] == grads[1] == pytest.approx([-0.5, -0.5, 1.0])
    assert grads[2] == pytest.approx([-0.25, -0.5, 2.0])


def test_rollout_engine_settings_fail_early_with_what_to_do(tmp_path):
    from protege.errors import StageError
    from protege.train.rollout_engines import RolloutEngineConfig

    with pytest.raises(ValueError, match="needs rollout.url"):
        RolloutEngineConfig(backend="vllm-server")
    pytest.importorskip("transformers")
    try:
        import vllm  # noqa: F401
    except ImportError:
        from protege.train.rollout_engines import VLLMRollouts

        with pytest.raises(StageError, match="vLLM is not installed here.*vllm-server"):
            VLLMRollouts(torch.nn.Linear(1, 1), None, "x", "float32", RolloutEngineConfig(backend="vllm"), 64, 4, 0)
    from protege.serve import free_port
    from protege.train.rollout_engines import VLLMServerRollouts

    url = f"http://127.0.0.1:{free_port()}"
    cfg = RolloutEngineConfig(backend="vllm-server", url=url, timeout=5)
    with pytest.raises(StageError, match=f"rollout.url {url}: no vLLM server answered"):
        VLLMServerRollouts(torch.nn.Linear(1, 1), None, cfg, tmp_path, 4)
    trained_rows = torch.nn.Module()
    trained_rows.embed_tokens = torch.nn.Embedding(4, 2)  # trainable-token rows: a vLLM LoRA cannot carry them
    trained_rows.peft_config = {"default": None}  # a policy with adapters (a plain model is the server's own)
    with pytest.raises(StageError, match="lora.trainable_tokens: none"):
        VLLMServerRollouts(trained_rows, None, cfg, tmp_path, 4)


def test_vllm_rollouts_refuse_a_multi_process_launch(monkeypatch, tmp_path):
    from protege.errors import StageError
    from protege.train.rollout_engines import RolloutEngineConfig, make_rollout_engine

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = RolloutEngineConfig(backend="vllm-server", url="http://127.0.0.1:1")
    with pytest.raises(StageError, match="runs in one training process.*rollout.backend protege"):
        make_rollout_engine(cfg, model=torch.nn.Linear(1, 1), tok=None, chat=None, spec="x", precision="float32",
                            out_dir=tmp_path, max_len=64, max_batch=4, seed=0, merge=False)
