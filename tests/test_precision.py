"""One `precision` setting: how `auto` resolves, and every trainer in bf16 against fp32 on tiny models
(loss curves, DPO's ln 2 and RL's KL 0 at step 0, frozen weights stored in bf16, trainable ones fp32),
gradient checkpointing (same gradients, less saved activation memory), and a bf16-trained model that
exports and loads back."""

from __future__ import annotations

import json
import math

import pytest
import torch

from protege.errors import StageError
from protege.precision import resolve_precision


def _rows(path):
    return [json.loads(line) for line in open(path)]


def _losses(out_dir):
    return [r["loss"] for r in _rows(f"{out_dir}/metrics.jsonl") if "loss" in r]


# ---- resolution -------------------------------------------------------------------------------

def test_auto_follows_the_cpus_bf16_units_and_explicit_choices_are_checked(monkeypatch):
    import protege.precision as precision

    monkeypatch.delenv("PROTEGE_PRECISION", raising=False)
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: ("avx512_bf16",))
    got = resolve_precision("auto", "cpu")
    assert (got.name, got.dtype, got.mixed_precision) == ("bf16", torch.bfloat16, "bf16")
    assert "avx512_bf16" in got.reason and got.manifest()["requested"] == "auto"
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: ())
    got = resolve_precision("auto", "cpu")
    assert got.name == "fp32" and "emulated" in got.reason and got.torch_name == "float32"
    assert resolve_precision("bfloat16", "cpu").name == "bf16"  # transformers' spelling
    assert resolve_precision("no", "cpu").name == "fp32"  # accelerate's
    with pytest.raises(StageError, match="GPU only"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(StageError, match="not one of"):
        resolve_precision("int4", "cpu")
    monkeypatch.setenv("PROTEGE_PRECISION", "bf16")
    got = resolve_precision("auto", "cpu")
    assert got.name == "bf16" and got.reason == "PROTEGE_PRECISION=bf16"
    assert resolve_precision("fp32", "cpu").name == "fp32"  # an explicit choice wins over the environment


def test_cpu_units_are_read_once_and_match_proc_cpuinfo():
    from protege.precision import _proc_cpu_flags, cpu_bf16_units

    flags = _proc_cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo")
    assert ("avx512_bf16" in cpu_bf16_units()) == ("avx512_bf16" in flags)
    assert cpu_bf16_units() is cpu_bf16_units()


def test_quantization_needs_lora():
    from protege.train.sft import SFTConfig

    with pytest.raises(ValueError, match="needs method: lora"):
        SFTConfig(method="full", quantization="nf4")


# ---- SFT ----------------------------------------------------------------------------------------

def _sft(tmp_path, model_dir, data, name, **kw):
    from test_train_sft import cfg

    from protege.train.sft import run

    settings = dict(max_steps=20, schedule="constant", learning_rate=1e-2, lora={"r": 8, "alpha": 16, "dropout": 0.0})
    config = cfg(tmp_path / name, model_dir, data, **{**settings, **kw})
    return config, run(config)


def test_sft_bf16_follows_the_fp32_curve_with_bf16_storage_and_fp32_trainables(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file
    from test_train_sft import write_chats

    data = write_chats(tmp_path / "chats.jsonl")
    c32, _ = _sft(tmp_path, tiny_llama_dir, data, "fp32", precision="fp32")
    c16, _ = _sft(tmp_path, tiny_llama_dir, data, "bf16", precision="bf16", save_merged=True)
    a, b = _losses(c32.out_dir), _losses(c16.out_dir)
    assert len(a) == len(b) == 20 and b[-1] < b[0] - 0.3
    assert max(abs(x - y) / x for x, y in zip(a, b)) < 0.01, (a, b)  # within 1% at every step
    manifest = json.loads(open(f"{c16.out_dir}/manifest.json").read())
    assert manifest["precision"] == {"precision": "bf16", "requested": "bf16", "reason": "requested"}
    assert "cpu_bf16_units" in manifest["hardware"]
    # the adapter is saved in fp32 and moved; the merged model is fp32 (folded in fp32, not into bf16)
    adapter = load_file(f"{c16.out_dir}/adapter/adapter_model.safetensors")
    assert all(v.dtype == torch.float32 for v in adapter.values())
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    merged = load_file(f"{c16.out_dir}/merged/model.safetensors")
    assert all(v.dtype == torch.float32 for v in merged.values())


def test_bf16_run_stores_frozen_weights_in_bf16_and_trains_fp32(tiny_llama_dir):
    from protege.chat import ChatFormat
    from protege.train.model import load_base, prepare_model
    from protege.train.sft import SFTConfig

    config = SFTConfig(model=str(tiny_llama_dir), precision="bf16", datasets=["unused.jsonl"])
    model, tok = load_base(config, resolve_precision("bf16", "cpu"), "cpu")
    model = prepare_model(config, model, ChatFormat.from_tokenizer(tok))
    kinds = {(p.dtype, p.requires_grad) for p in model.parameters()}
    assert kinds == {(torch.bfloat16, False), (torch.float32, True)}
    # full fine-tuning keeps fp32 master weights (autocast runs the matmuls in bf16)
    full = SFTConfig(model=str(tiny_llama_dir), precision="bf16", method="full", datasets=["unused.jsonl"])
    model, tok = load_base(full, resolve_precision("bf16", "cpu"), "cpu")
    assert {p.dtype for p in prepare_model(full, model, ChatFormat.from_tokenizer(tok)).parameters()} == {torch.float32}


def test_full_finetuning_in_bf16_learns(tmp_path, tiny_gemma):
    from test_train_sft import write_chats

    model, tok = tiny_gemma
    model.save_pretrained(tmp_path / "g")
    tok.save_pretrained(tmp_path / "g")
    data = write_chats(tmp_path / "chats.jsonl")
    config, _ = _sft(tmp_path, tmp_path / "g", data, "full", precision="bf16", method="full", learning_rate=1e-3)
    curve = _losses(config.out_dir)
    assert curve[-1] < curve[0] - 0.3, curve
    from safetensors.torch import load_file

    before = {k: v for k, v in model.state_dict().items()}
    after = load_file(f"{config.out_dir}/model/model.safetensors")
    assert all(v.dtype == torch.float32 for v in after.values())  # fp32 master weights were trained and saved
    assert any(not torch.equal(after[k], before[k]) for k in after if k in before)


# ---- gradient checkpointing ---------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_gradient_checkpointing_gives_the_same_gradients_and_saves_fewer_activations(arch, request):
    """Non-reentrant checkpointing: gradients equal the unchecked run's; the activations autograd keeps
    for backward (counted through saved-tensor hooks) shrink."""
    import copy

    from protege.chat import ChatFormat
    from protege.train.model import prepare_model
    from protege.train.sft import SFTConfig, SFTModule

    base, tok = request.getfixturevalue(f"tiny_{arch}")
    chat = ChatFormat.from_tokenizer(tok)
    torch.manual_seed(0)
    ids = torch.randint(5, 500, (2, 48))
    labels = ids.clone()
    pos = torch.arange(48).expand(2, 48)
    grads, saved = {}, {}
    for ckpt in (False, True):
        config = SFTConfig(model="x", datasets=["x"], gradient_checkpointing=ckpt, lora={"dropout": 0.0})
        torch.manual_seed(1)
        model = prepare_model(config, copy.deepcopy(base), chat)
        model.train()
        module = SFTModule(model)
        nbytes = 0

        def pack(t):
            nonlocal nbytes
            nbytes += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = module(ids, pos, labels, normalizer=1.0)
        loss.backward()
        grads[ckpt] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        saved[ckpt] = nbytes
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-6, msg=name)
    assert saved[True] < 0.6 * saved[False], saved


# ---- preference and RL ---------------------------------------------------------------------------

def test_dpo_bf16_starts_at_ln2_and_learns(tmp_path, tiny_llama_dir):
    from test_train_preference import dpo_cfg, write_pairs

    from protege.train.dpo import run

    pairs = write_pairs(tmp_path / "pairs.jsonl")
    config = dpo_cfg(tmp_path, tiny_llama_dir, pairs, precision="bf16")
    run(config)
    loss = _losses(config.out_dir)
    # the reference log-probs are computed in the policy's precision: at step 0 policy == reference exactly
    assert loss[0] == pytest.approx(math.log(2.0), abs=1e-3)
    assert sum(loss[-3:]) / 3 < loss[0] - 0.1, loss


def test_rm_bf16_learns_and_saves_an_fp32_classifier(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file
    from test_train_preference import rm_cfg, write_pairs

    from protege.train.rm import run

    config = rm_cfg(tmp_path, tiny_llama_dir, write_pairs(tmp_path / "pairs.jsonl"), precision="bf16")
    summary = run(config)
    loss = _losses(config.out_dir)
    assert sum(loss[-3:]) / 3 < loss[0] - 0.2, loss
    assert summary["eval_accuracy"] >= 0.9
    weights = load_file(str(tmp_path / "rm" / "model" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float32}


def test_grpo_bf16_starts_at_kl_0_and_raises_the_reward(tmp_path, tiny_policy_dir):
    from test_grpo import _config

    from protege.train.grpo import run

    cfg = _config(tmp_path, tiny_policy_dir, precision="bf16")
    run(cfg)
    out = tmp_path / "grpo"
    rows = [r for r in _rows(out / "metrics.jsonl") if "reward" in r]
    first, last = sum(r["reward"] for r in rows[:2]) / 2, sum(r["reward"] for r in rows[-4:]) / 4
    assert last > first + 0.25, [r["reward"] for r in rows]
    watch = json.loads((out / "overoptimisation.json").read_text())
    assert watch["history"][0]["kl"] == pytest.approx(0.0, abs=1e-6)


def test_ppo_bf16_starts_at_kl_0(tmp_path, tiny_policy_dir):
    from test_ppo import _cfg

    from protege.train.ppo import run

    run(_cfg(tmp_path, tiny_policy_dir, precision="bf16"))
    watch = json.loads((tmp_path / "ppo" / "overoptimisation.json").read_text())
    assert watch["history"][0]["kl"] == pytest.approx(0.0, abs=1e-6) and watch["history"][-1]["kl"] > 0


# ---- QLoRA ---------------------------------------------------------------------------------------

@pytest.fixture()
def llama64_dir(tmp_path):
    """A tiny LLaMA 64 wide: bitsandbytes quantizes in blocks of 64 inputs, and its CPU inference kernel
    needs at least one whole block per row (32-wide layers train but cannot be evaluated)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)
    out = tmp_path / "llama64"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_qlora_learns_adapters_on_a_base_that_stays_quantized(tmp_path, llama64_dir, quantization):
    pytest.importorskip("bitsandbytes")
    tiny_llama_dir = llama64_dir
    from safetensors.torch import load_file
    from test_train_sft import write_chats

    from protege.chat import ChatFormat
    from protege.train.model import load_base, prepare_model
    from protege.train.sft import SFTConfig

    data = write_chats(tmp_path / "chats.jsonl")
    config, _ = _sft(tmp_path, tiny_llama_dir, data, quantization, precision="bf16", quantization=quantization,
                     save_merged=True)
    curve = _losses(config.out_dir)
    assert sum(curve[-3:]) / 3 < curve[0] - 0.2, curve
    adapter = load_file(f"{config.out_dir}/adapter/adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    # the base was quantized while training (bitsandbytes layers, packed integer weights) ...
    probe = SFTConfig(model=str(tiny_llama_dir), precision="bf16", quantization=quantization, datasets=["x"])
    model, tok = load_base(probe, resolve_precision("bf16", "cpu"), "cpu")
    model = prepare_model(probe, model, ChatFormat.from_tokenizer(tok))
    layers = [type(m).__name__ for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    assert layers and {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert any(p.dtype in (torch.uint8, torch.int8) for p in model.parameters())
    # ... and the merged model is the adapter folded into the fp32 (unquantized) base
    merged = load_file(f"{config.out_dir}/merged/model.safetensors")
    assert {v.dtype for v in merged.values()} == {torch.float32}


# ---- engine ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_engine_greedy_in_bf16_equals_hf_generate_in_bf16(arch, request):
    import copy

    from test_engine import PROMPTS, _hf_greedy, _ids

    from protege.engine import Engine, SamplingParams

    model, tok = request.getfixturevalue(f"tiny_{arch}")
    model = copy.deepcopy(model).to(torch.bfloat16)
    prompts = _ids(tok, PROMPTS)
    outs = Engine(model, tok).generate(prompts, SamplingParams(max_new_tokens=24, stop_token_ids=[]))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == _hf_greedy(model, prompt, 24)


def test_engine_for_resolves_precision(tiny_llama_dir, monkeypatch):
    from protege.engine import engine_for

    assert engine_for(str(tiny_llama_dir), backend="torch", precision="bf16").dtype == torch.bfloat16
    assert engine_for(str(tiny_llama_dir), backend="torch", precision="fp32").dtype == torch.float32
    monkeypatch.setenv("PROTEGE_PRECISION", "bf16")
    assert engine_for(str(tiny_llama_dir), backend="torch").dtype == torch.bfloat16


@pytest.mark.slow
def test_gemma_270m_bf16_engine_greedy_departs_from_hf_generate_only_at_bf16_ties():
    """gemma-3-270m in bf16, 16 prompts x 32 greedy tokens: the engine (batched, ragged) against HF
    `generate` one prompt at a time. bf16 logits carry 8 bits of mantissa, so two tokens' logits are often
    equal or one unit of least precision apart, and any change in the order of a sum (a batched GEMM, a
    masked attention kernel) can flip such an argmax. What must hold: every place the two disagree, the
    engine's token is the argmax, to one bf16 ulp, of the model's full forward over the same text. (Not "HF's
    two tokens are within an ulp": on a CPU with AMX-BF16, HF's own cached decoding drifts from its full
    forward by several ulps, e.g. picking a token 0.5 below the full forward's best at a logit of 27.)"""
    from conftest import builtin_model
    from test_engine import _hf_greedy, _ids

    from protege.engine import Engine, SamplingParams

    sys_path = __import__("sys").path
    sys_path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "benchmarks"))
    from generate_throughput import PROMPTS

    eng = Engine.from_spec(builtin_model("gemma-3-270m"), dtype="bfloat16")
    prompts = _ids(eng.tokenizer, PROMPTS)
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=32, stop_token_ids=[]))
    identical = 0
    for prompt, out in zip(prompts, outs):
        ref = _hf_greedy(eng.model, prompt, 32)
        i = next((i for i, (a, b) in enumerate(zip(out.token_ids, ref)) if a != b), None)
        if i is None:
            identical += 1
            continue
        with torch.no_grad():
            logits = eng.model(input_ids=torch.tensor([prompt + ref[:i]])).logits[0, -1].float()
        ours, theirs, best = logits[out.token_ids[i]].item(), logits[ref[i]].item(), logits.max().item()
        ulp = 2.0 ** (math.floor(math.log2(abs(best))) - 7)  # bf16: 8 significant bits
        assert best - ours <= ulp, (i, ours, theirs, best)
    assert identical >= 2, identical  # measured: 4 of 16 identical for all 32 tokens


def test_a_model_trained_in_bf16_exports_and_passes_the_export_checks(tmp_path, tiny_llama_dir):
    pytest.importorskip("llama_cpp")
    from test_export import _converter_or_skip
    from test_train_sft import write_chats

    from protege.export import ExportConfig, run

    _converter_or_skip()
    config, _ = _sft(tmp_path, tiny_llama_dir, write_chats(tmp_path / "chats.jsonl"), "bf16", precision="bf16",
                     max_steps=8)
    out = tmp_path / "ship"
    result = run(ExportConfig(model=f"{config.out_dir}/adapter", out_dir=str(out), gguf=["f16"], verify_prompts=8,
                              verify_tokens=16, ppl_n=4))
    report = json.loads((out / "verify.json").read_text())
    assert report["template"]["ok"] and report["parity"]["prompts"] == 8
    assert report["parity"]["equal"] >= 7, report["parity"]["rows"]
    assert result["greedy_equal"] == f"{report['parity']['equal']}/8"
    from protege.models import load

    model, _ = load(str(out / "hf"))
    assert next(model.parameters()).dtype == torch.float32  # merged in fp32, then loads back as any HF folder


def test_gpu_check_smoke_runs_every_setting_on_the_cpu(capsys):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = gpu_check  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(gpu_check)
    settings = ["fp32 lora", "bf16 lora+ckpt", "fsdp2 bf16 lora+ckpt"]
    try:
        import bitsandbytes  # noqa: F401

        settings.append("nf4 qlora+ckpt")
    except ImportError:
        pass
    sharded = 1
    try:
        import deepspeed  # noqa: F401

        settings.append("zero3 bf16 lora+ckpt")
        sharded += 1
    except ImportError:
        pass
    rows = gpu_check.run(["tiny-llama"], settings, seq=64, batches=[1, 4], new_tokens=4, steps=1, device="cpu")
    # sft + dpo per setting (FSDP2, ZeRO-3: sft only); decode fp32/bf16 at 2 batches
    assert len(rows) == 2 * len(settings) - sharded + 2 * 2
    import torch.distributed as dist

    assert not dist.is_initialized()  # the FSDP2 row's one-process group is gone again
    failed = [r for r in rows if r.tokens_per_s is None]
    assert not failed, failed
    assert all(r.tokens_per_s > 0 and r.peak_gb > 0 for r in rows)
