"""Preference learning: pure losses (hand values), the log-prob primitive (vs full logits, gradients
included), parity with TRL's DPOTrainer, and RM / DPO end to end on tiny models (learning, frozen
weights, resume exactness, cached reference, outputs that transformers loads)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from protege.train.logprobs import sequence_logprobs, token_logprobs
from protege.train.losses import IGNORE_INDEX, dpo_loss, margin_values, reward_loss


# ---- pure losses ---------------------------------------------------------------------------

def test_reward_loss_hand_values_with_margins_and_centring():
    rc, rr = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    m = torch.tensor([0.0, 1.0 / 3.0, 1.0])
    want = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(1.0 / 3.0)), math.log1p(math.exp(3.0))]
    assert reward_loss(rc, rr, m).tolist() == pytest.approx(want, rel=1e-6)
    centred = reward_loss(rc, rr, None, center_coef=0.01)
    assert centred[0].item() == pytest.approx(math.log1p(math.exp(-1.0)) + 0.01 * 9.0, rel=1e-6)


def test_margin_schemes_follow_llama2_levels():
    margins = torch.tensor([0.0, 0.7, 1.5, 3.0, float("nan")])
    assert margin_values(margins, "llama2-small").tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1, 0])
    assert margin_values(margins, "llama2-large").tolist() == pytest.approx([0, 1, 2, 3, 0])
    assert margin_values(margins, "raw").tolist()[:4] == pytest.approx([0, 0.7, 1.5, 3.0])
    assert margin_values(margins, "none").abs().sum() == 0
    with pytest.raises(ValueError, match="unknown margin scheme"):
        margin_values(margins, "llama3")


def test_dpo_loss_hand_values():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0))
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # logits = (-10 + 12) - (-11 + 11) = 2; loss = -log sigmoid(0.5 * 2)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)
    assert cr.item() == pytest.approx(0.5) and rj.item() == pytest.approx(-0.5)
    smooth, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    assert smooth.item() == pytest.approx(0.9 * math.log1p(math.exp(-1.0)) + 0.1 * math.log1p(math.exp(1.0)), rel=1e-6)
    at_start, _, _ = dpo_loss(rc, rr, rc, rr)
    assert at_start.item() == pytest.approx(math.log(2.0))  # policy == reference


# ---- the log-prob primitive ----------------------------------------------------------------

@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("override", [False, True])
def test_token_logprobs_match_full_log_softmax_values_and_gradients(softcap, override):
    g = torch.Generator().manual_seed(0)
    n, h, v = 37, 16, 300
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    ids = torch.tensor([3, 7, 250])
    rows = torch.randn(3, h, generator=g, dtype=torch.float64, requires_grad=True) if override else None
    upstream = torch.randn(n, generator=g, dtype=torch.float64)

    ours = token_logprobs(hidden, weight, targets, softcap, chunk_size=8, row_override=(ids, rows) if override else None)
    w_eff = weight.index_put((ids,), rows) if override else weight
    z = hidden @ w_eff.t()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    ref = F.log_softmax(z, -1).gather(1, targets[:, None])[:, 0]
    assert torch.allclose(ours, ref, atol=1e-10)
    params = [hidden, weight] + ([rows] if override else [])
    g_ours = torch.autograd.grad((ours * upstream).sum(), params)
    g_ref = torch.autograd.grad((ref * upstream).sum(), params)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-9)


def test_sequence_logprobs_sum_each_sequence_of_a_packed_batch():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(50, 8, generator=g, dtype=torch.float64)
    labels = torch.tensor([[5, 6, IGNORE_INDEX, 7, 8, IGNORE_INDEX], [9, IGNORE_INDEX, IGNORE_INDEX, 1, 2, 3]])
    seq = torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, -1, -1, -1, -1]])
    seq = torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 3, 3, 3, 3]])
    sums, counts = sequence_logprobs(hidden, weight, labels, seq, 4)
    lp = F.log_softmax(hidden @ weight.t(), -1)
    want = [lp[0, 0, 5] + lp[0, 1, 6], lp[0, 3, 7] + lp[0, 4, 8], lp[1, 0, 9], lp[1, 3, 1] + lp[1, 4, 2] + lp[1, 5, 3]]
    assert torch.allclose(sums, torch.stack(want)) and counts.tolist() == [2, 2, 1, 3]


# ---- data for the trainers -----------------------------------------------------------------

def write_pairs(path, n=64, seed=0):
    """Arithmetic pairs whose chosen answer is right and short, rejected is a refusal: learnable by a tiny model."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            fh.write(json.dumps({"prompt": f"What is {a} plus {b}?", "chosen": f"{a} plus {b} is {a + b}.",
                                 "rejected": f"I do not know, sorry {i}.", "margin": rng.choice([0, 1, 2, 3])}) + "\n")
    return str(path)


@pytest.fixture()
def pairs(tmp_path):
    return write_pairs(tmp_path / "pairs.jsonl")


def metric(out_dir, key):
    return [r[key] for r in map(json.loads, open(f"{out_dir}/metrics.jsonl")) if key in r]


# ---- DPO --------------------------------------------------------------------------------------

def dpo_cfg(tmp_path, model_dir, data, **kw):
    from protege.train.dpo import DPOConfig

    base = dict(model=str(model_dir), datasets=[data], out_dir=str(tmp_path / "dpo"), max_length=64, batch_size=4,
                learning_rate=1e-2, max_steps=16, save_every=0, tensorboard=False, warmup_ratio=0.0, seed=0,
                eval_fraction=0.2, reference_cache=str(tmp_path / "refcache"), lora={"dropout": 0.0},
                schedule="constant")
    base.update(kw)
    return DPOConfig(**base)


def test_dpo_lora_learns_only_lora_changes_and_reference_is_cached(tmp_path, tiny_llama_dir, pairs, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from protege.train.dpo import run

    config = dpo_cfg(tmp_path, tiny_llama_dir, pairs)
    summary = run(config)
    loss = metric(config.out_dir, "loss")
    assert loss[0] == pytest.approx(math.log(2.0), abs=1e-4)  # policy == reference at step 0
    assert sum(loss[-3:]) / 3 < loss[0] - 0.1, loss
    assert summary["eval_rewards_accuracy"] > 0.8 and summary["eval_rewards_margin"] > 0
    assert "chosen_logp_drift" in json.loads(open(f"{config.out_dir}/metrics.jsonl").readline())
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(tmp_path / "dpo" / "adapter"))
    changed = [n for n, p in trained.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert changed
    frozen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in trained.named_parameters()
              if "lora_" not in n and "trainable_tokens" not in n and "token_adapter" not in n}
    for name, p in base.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    cache = list((tmp_path / "refcache").glob("*.jsonl"))
    assert len(cache) == 1 and len(cache[0].read_text().splitlines()) == 64
    # a second run with another beta reuses the cached reference log-probs
    capsys.readouterr()
    run(dpo_cfg(tmp_path, tiny_llama_dir, pairs, beta=0.3, out_dir=str(tmp_path / "dpo2"), max_steps=2))
    assert "computing" not in capsys.readouterr().err


def test_dpo_reference_is_the_base_model_with_adapters_disabled(tiny_llama):
    import copy

    from protege.chat import ChatFormat
    from protege.train.policy import PolicyLogprobs, batch_args
    from protege.train.pair_data import PairStats, collate_pairs, tokenize_pairs
    from protege.train.settings import TrainSettings
    from protege.train.model import prepare_model
    from protege.records import Comparison

    model, tok = tiny_llama
    base = copy.deepcopy(model)
    chat = ChatFormat.from_tokenizer(tok)
    recs = [Comparison([{"role": "user", "content": "Hi"}], {"role": "assistant", "content": "Hello there"},
                       {"role": "assistant", "content": "Go away"})]
    pairs = tokenize_pairs(recs, chat, 64, PairStats())
    batch = collate_pairs(pairs, tok.pad_token_id, 64)
    policy = prepare_model(TrainSettings(lora={"dropout": 0.0}), copy.deepcopy(model), chat)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if p.requires_grad:
                p.add_(0.5)  # move every adapter (LoRA and token rows) away from the base
    args = batch_args(batch, 2)
    with torch.no_grad():
        want = PolicyLogprobs(base.eval())(*args)
        with policy.disable_adapter():
            got = PolicyLogprobs(policy.eval())(*args)
        moved = PolicyLogprobs(policy)(*args)
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(moved, want, atol=1e-3)


def test_policy_logprobs_score_under_the_sampling_temperature(tiny_llama, tiny_gemma):
    """RL scores rollouts as they were sampled: log_softmax(logits / T), not the T = 1 distribution."""
    from protege.train.policy import PolicyLogprobs

    model, _ = tiny_llama
    ids = torch.tensor([[3, 7, 11, 5, 9]])
    pos = torch.arange(5).unsqueeze(0)
    index, target = torch.tensor([1, 2, 3]), torch.tensor([11, 5, 9])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
        want = F.log_softmax(logits / 2.0, -1)[index, target].sum()
        cold = F.log_softmax(logits, -1)[index, target].sum()
        got = PolicyLogprobs(model.eval(), temperature=2.0)(ids, pos, None, index, target, torch.zeros(3, dtype=torch.long), 1)
    assert got.item() == pytest.approx(want.item(), abs=1e-4)
    assert abs(got.item() - cold.item()) > 1e-3  # the test can tell the two apart
    with pytest.raises(ValueError, match="> 0"):
        PolicyLogprobs(model, temperature=0.0)
    gemma, _ = tiny_gemma
    if getattr(gemma.config, "final_logit_softcapping", None):
        with pytest.raises(ValueError, match="soft-capped"):
            PolicyLogprobs(gemma, temperature=1.3)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_shared_prompt_layout_gives_the_same_logprobs_scores_and_gradients(arch, request):
    """[prompt, chosen, rejected] under one 4-D mask == prompt + each answer as separate sequences."""
    import copy

    from protege.chat import ChatFormat
    from protege.records import Comparison
    from protege.train.policy import PolicyLogprobs, batch_args
    from protege.train.pair_data import PairStats, collate_pairs, tokenize_pairs
    from protege.train.rm import RewardModule

    model, tok = request.getfixturevalue(f"tiny_{arch}")
    model = copy.deepcopy(model)
    chat = ChatFormat.from_tokenizer(tok)
    recs = [Comparison([{"role": "user", "content": q}], {"role": "assistant", "content": a},
                       {"role": "assistant", "content": b})
            for q, a, b in [("Hi", "Hello there", "Go"), ("What is two plus three?", "Five.", "Two plus three is six"),
                            ("Name a sea", "Blue", "The sea")]]
    pairs = tokenize_pairs(recs, chat, 16 if arch == "gemma" else 64, PairStats())  # gemma: inside its window
    assert len(pairs) == 3
    pol = PolicyLogprobs(model)
    apart = collate_pairs(pairs, tok.pad_token_id, 64)
    shared = collate_pairs(pairs, tok.pad_token_id, 64, share_prompt=True)
    assert shared["input_ids"].numel() < apart["input_ids"].numel()
    a, s = pol(*batch_args(apart, 6)), pol(*batch_args(shared, 6))
    assert torch.allclose(a, s, atol=1e-5), (a, s)
    params = [p for p in model.parameters()]
    ga = torch.autograd.grad(a.sum(), params, allow_unused=True)
    gs = torch.autograd.grad(s.sum(), params, allow_unused=True)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(ga, gs) if x is not None)
    # the reward model reads each answer's last token: the same score either way
    from transformers import AutoModelForSequenceClassification

    with torch.no_grad():
        cfg = copy.deepcopy(model.config)
        cfg.num_labels = 1
        rm = AutoModelForSequenceClassification.from_config(cfg)
        rm.load_state_dict(model.state_dict(), strict=False)
        head = RewardModule(rm)
        ra = head(apart["input_ids"], apart["position_ids"], apart["last_index"], apart["attention_mask"])
        rs = head(shared["input_ids"], shared["position_ids"], shared["last_index"], shared["attention_mask"])
    assert torch.allclose(ra, rs, atol=1e-5)


def test_dpo_resume_is_exact(tmp_path, tiny_llama_dir, pairs):
    from protege.train.dpo import run

    full = dpo_cfg(tmp_path, tiny_llama_dir, pairs, max_steps=10, out_dir=str(tmp_path / "a"))
    run(full)
    half = dpo_cfg(tmp_path, tiny_llama_dir, pairs, max_steps=10, out_dir=str(tmp_path / "b"))
    assert run(half, stop_after_steps=5)["stopped_at_step"] == 5
    run(half)
    assert metric(tmp_path / "b", "loss") == pytest.approx(metric(tmp_path / "a", "loss"), rel=1e-5)


def test_dpo_full_finetune_uses_frozen_copy_as_reference(tmp_path, tiny_gemma, pairs):
    from protege.train.dpo import run

    model, tok = tiny_gemma
    model.save_pretrained(tmp_path / "g")
    tok.save_pretrained(tmp_path / "g")
    config = dpo_cfg(tmp_path, tmp_path / "g", pairs, method="full", learning_rate=3e-3, max_steps=12)
    run(config)
    loss = metric(config.out_dir, "loss")
    assert loss[0] == pytest.approx(math.log(2.0), abs=1e-4) and loss[-1] < loss[0]
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "dpo" / "model")
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), model.parameters()))


def test_dpo_matches_trl_dpo_trainer(tiny_llama, request):
    """Same tiny model, same TRL-tokenised batch: our log-prob primitive + dpo_loss give TRL's loss,
    metrics and gradients (TRL computes full-vocabulary logits; we only score answer tokens)."""
    trl = pytest.importorskip("trl")
    import copy
    import warnings

    from datasets import Dataset

    from protege.train.policy import PolicyLogprobs

    warnings.filterwarnings("ignore")
    model, tok = copy.deepcopy(tiny_llama[0]), tiny_llama[1]
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():  # policy != reference, so the loss is not log 2
            p.add_(0.02 * torch.randn_like(p))
    ds = Dataset.from_list([{"prompt": f"What is {i} plus {i}?", "chosen": f" {2 * i}.",
                             "rejected": f" I do not know {i}."} for i in range(6)])
    args = trl.DPOConfig(output_dir="/tmp/protege-trl-parity", per_device_train_batch_size=6, report_to=[],
                         use_cpu=True, beta=0.1, max_length=64, bf16=False)
    trainer = trl.DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    from accelerate.state import AcceleratorState

    request.addfinalizer(lambda: AcceleratorState._reset_state(True))  # TRL's accelerator must not leak into later tests
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    trl_loss = trainer._compute_loss(trainer.model, batch, return_outputs=True)[0]
    trl_grads = torch.autograd.grad(trl_loss, [p for p in model.parameters()], allow_unused=True)
    m = trainer._metrics["eval"]

    ids, mask, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    labels = torch.where(comp[:, 1:] == 1, ids[:, 1:], IGNORE_INDEX)
    labels = torch.cat([labels, torch.full_like(labels[:, :1], IGNORE_INDEX)], 1)
    seq = torch.arange(ids.shape[0])[:, None].expand_as(ids)

    def logps(net):
        pol = PolicyLogprobs(net)
        hidden = pol._parts.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return sequence_logprobs(hidden, pol._parts.head.weight, labels, seq, ids.shape[0])[0]

    pol = logps(model)
    with torch.no_grad():
        r = logps(ref)
        # TRL's own reference forward (no grad) deviates from float64 log-softmax by up to ~2e-3 per
        # sequence on this model, ours by < 1e-5; so the loss is compared on TRL's reference log-probs,
        # and our reference log-probs against float64.
        kw = {k: v for k, v in batch.items() if k != "completion_mask"}
        trl_ref = trainer.ref_model(**kw, labels=ids.masked_fill(comp == 0, -100), use_cache=False,
                                    fused_lm_head=True).log_probs.sum(1)
        from tiny import tiny_model

        exact_model = tiny_model("llama", seed=0)[0].double()  # the reference's weights, untouched by TRL
        assert all(torch.equal(a.double(), b) for a, b in zip(ref.parameters(), exact_model.parameters()))
        full = torch.log_softmax(exact_model(input_ids=ids, attention_mask=mask).logits, -1)
        exact = (full[:, :-1].gather(2, ids[:, 1:, None])[..., 0] * comp[:, 1:]).sum(1)
    assert torch.allclose(r.double(), exact, atol=1e-4)
    pc, pr = pol.chunk(2)
    rc, rr = trl_ref.chunk(2)
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.1)
    ours = losses.mean()
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    assert pc.mean().item() == pytest.approx(m["logps/chosen"][-1], abs=1e-4)
    assert pr.mean().item() == pytest.approx(m["logps/rejected"][-1], abs=1e-4)
    assert cr.mean().item() == pytest.approx(m["rewards/chosen"][-1], abs=1e-5)
    assert rj.mean().item() == pytest.approx(m["rewards/rejected"][-1], abs=1e-5)
    our_grads = torch.autograd.grad(ours, [p for p in model.parameters()], allow_unused=True)
    compared = 0
    for a, b in zip(our_grads, trl_grads):
        if a is not None and b is not None:
            assert torch.allclose(a, b, atol=1e-6)
            compared += 1
    assert compared > 10


# ---- RM ---------------------------------------------------------------------------------------

def rm_cfg(tmp_path, model_dir, data, **kw):
    from protege.train.rm import RMConfig

    base = dict(model=str(model_dir), datasets=[data], out_dir=str(tmp_path / "rm"), max_length=64, batch_size=4,
                learning_rate=1e-2, max_steps=20, save_every=0, tensorboard=False, warmup_ratio=0.0, seed=0,
                eval_fraction=0.25, lora={"dropout": 0.0}, schedule="constant")
    base.update(kw)
    return RMConfig(**base)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_rm_learns_and_saves_a_sequence_classifier(tmp_path, arch, pairs, request):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from protege.chat import ChatFormat
    from protege.train.rm import load_reward_model, run, score

    model, tok = request.getfixturevalue(f"tiny_{arch}")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    config = rm_cfg(tmp_path, tmp_path / "m", pairs)
    summary = run(config)
    loss = metric(config.out_dir, "loss")
    assert sum(loss[-3:]) / 3 < loss[0] - 0.2, loss
    assert summary["eval_accuracy"] >= 0.9
    report = json.loads((tmp_path / "rm" / "rm_eval.json").read_text())
    assert report["pairs"] == 16 and 0 <= report["ece"] <= 1 and sum(b["n"] for b in report["reliability"]) == 32
    assert set(report["accuracy_by_margin"]) <= {"level 0", "level 1", "level 2", "level 3"}
    # a plain HF sequence classifier: transformers loads it; the decoder moved (LoRA merged), the score head trained
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model")
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    prefix = base.base_model_prefix
    moved = [n for n, p in getattr(rm, prefix).named_parameters()
             if not torch.equal(p, dict(getattr(base, prefix).named_parameters())[n])]
    assert moved
    # protege scores with it as it was trained: right answers above refusals
    rm, rtok = load_reward_model(str(tmp_path / "rm" / "model"))
    chat = ChatFormat.from_tokenizer(rtok)
    prompt = [{"role": "user", "content": "What is 2 plus 3?"}]
    good, bad = score(rm, chat, [prompt, prompt], ["2 plus 3 is 5.", "I do not know, sorry 7."])
    assert good > bad


def test_rm_resume_is_exact_and_refuses_a_changed_config(tmp_path, tiny_llama_dir, pairs):
    from protege.errors import StageError
    from protege.train.rm import run

    run(rm_cfg(tmp_path, tiny_llama_dir, pairs, max_steps=8, out_dir=str(tmp_path / "a")))
    half = rm_cfg(tmp_path, tiny_llama_dir, pairs, max_steps=8, out_dir=str(tmp_path / "b"))
    run(half, stop_after_steps=4)
    run(half)
    assert metric(tmp_path / "b", "loss") == pytest.approx(metric(tmp_path / "a", "loss"), rel=1e-5)
    run(rm_cfg(tmp_path, tiny_llama_dir, pairs, max_steps=8, out_dir=str(tmp_path / "c"), margin="none"),
        stop_after_steps=2)
    with pytest.raises(StageError, match="changed: margin"):
        run(rm_cfg(tmp_path, tiny_llama_dir, pairs, max_steps=8, out_dir=str(tmp_path / "c"), margin="raw"))


def test_rm_report_and_llama2_combination():
    from protege.train.rm import llama2_reward, rm_report

    rep = rm_report([2.0, 1.0, -1.0, 0.5], [0.0, 2.0, -3.0, 0.0], [0.0, 3.0, float("nan"), 1.0], bins=5)
    assert rep["accuracy"] == 0.75 and rep["accuracy_by_margin"]["level 3"] == {"n": 1, "accuracy": 0.0}
    assert rep["accuracy_by_margin"]["no margin"]["accuracy"] == 1.0
    assert sum(b["n"] for b in rep["reliability"]) == 8
    # the cut-off that best flags rejected answers and passes chosen ones, for `serve --moderation`
    assert rep["moderation"] == {"threshold": 0.5, "rejected_flagged": 0.75, "chosen_flagged": 0.25}
    helpful, safety = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([-3.0, 0.5, 0.5])
    tagged = torch.tensor([False, False, True])
    # sigmoid(-3) = 0.047 < 0.15 -> safety; 0.5 untagged -> helpful; tagged -> safety
    assert llama2_reward(helpful, safety, tagged).tolist() == [-3.0, 1.0, 0.5]


def test_preference_trainers_bad_input(tmp_path, tiny_llama_dir):
    from protege.errors import StageError
    from protege.records import RecordError
    from protege.train.dpo import run as dpo_run
    from protege.train.rm import run as rm_run

    convs = tmp_path / "convs.jsonl"
    convs.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
    with pytest.raises(RecordError, match="needs preference pairs"):
        rm_run(rm_cfg(tmp_path, tiny_llama_dir, str(convs)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n{not json\n")
    with pytest.raises(RecordError, match=r"bad.jsonl:2: bad JSON"):
        dpo_run(dpo_cfg(tmp_path, tiny_llama_dir, str(bad)))
    with pytest.raises(StageError, match="datasets` is empty"):
        dpo_run(dpo_cfg(tmp_path, tiny_llama_dir, str(bad), datasets=[]))


def test_pairs_truncate_with_one_prompt_cut_and_count(tiny_llama):
    from protege.chat import ChatFormat
    from protege.records import Comparison
    from protege.train.pair_data import PairStats, tokenize_pairs

    _, tok = tiny_llama
    chat = ChatFormat.from_tokenizer(tok)
    long_prompt = "the quick brown fox " * 40
    recs = [Comparison([{"role": "user", "content": long_prompt}], {"role": "assistant", "content": "short yes"},
                       {"role": "assistant", "content": "a somewhat longer no answer"}),
            Comparison([{"role": "user", "content": "hi"}], {"role": "assistant", "content": "x " * 200},
                       {"role": "assistant", "content": "x " * 200 + "y"})]
    stats = PairStats()
    out = tokenize_pairs(recs, chat, 48, stats)
    assert stats.truncated == 2 and stats.pairs + sum(stats.skipped.values()) == 2
    for p in out:
        assert len(p.chosen.input_ids) <= 48 and len(p.rejected.input_ids) <= 48
        # both sides keep the same prompt tokens
        assert p.chosen.input_ids[:10] == p.rejected.input_ids[:10]
    assert stats.skipped.get("chosen == rejected after truncation", 0) == 1  # the answers differed only past the cut


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_embed_inputs_equals_peft_trainable_tokens_values_and_gradients(arch, request):
    """Our sparse lookup == PEFT's index_copy embedding (Gemma's sqrt(H) scale included), gradient included."""
    import copy

    from protege.chat import ChatFormat
    from protege.lm_head import embed_inputs
    from protege.train.model import prepare_model
    from protege.train.settings import TrainSettings

    model, tok = request.getfixturevalue(f"tiny_{arch}")
    chat = ChatFormat.from_tokenizer(tok)
    policy = prepare_model(TrainSettings(lora={"dropout": 0.0}), copy.deepcopy(model), chat)
    layer = policy.get_base_model().get_input_embeddings().token_adapter
    name = layer.active_adapters[0]
    delta = layer.trainable_tokens_delta[name]
    with torch.no_grad():
        delta.add_(torch.randn_like(delta))  # trainable rows now differ from the frozen ones
    ids = torch.tensor([chat.encode([{"role": "user", "content": "Hi there"},
                                     {"role": "assistant", "content": "Hello"}]).input_ids])
    assert any(int(i) in layer.token_indices[name] for i in ids[0])
    ours = embed_inputs(policy, ids)
    theirs = policy.get_base_model().get_input_embeddings()(ids)
    assert torch.allclose(ours, theirs, atol=1e-6)
    g_ours = torch.autograd.grad(ours.square().sum(), delta)[0]
    g_theirs = torch.autograd.grad(theirs.square().sum(), delta)[0]
    assert torch.allclose(g_ours, g_theirs, atol=1e-5) and g_ours.abs().sum() > 0
    with policy.disable_adapter():
        assert embed_inputs(policy, ids) is None  # the reference embeds through the frozen base
