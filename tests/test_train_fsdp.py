"""FSDP2 through accelerate on two CPU processes (gloo), launched with the shipped recipes/accelerate/fsdp2.yaml.

Sharded training must give the loss curve and the trained weights of one process with the same global batch,
and a run whose ranks are all killed with SIGKILL must resume from its sharded checkpoint to the same end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train_sft import write_chats

ROOT = Path(__file__).resolve().parents[1]
FSDP2 = ROOT / "recipes" / "accelerate" / "fsdp2.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")]


def _one(method, args, out):
    proc = subprocess.run([sys.executable, "-m", "protege.cli", "train", method, *args, "--grad_accum=2",
                           f"--out_dir={out}"], capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _fsdp_cmd(method, args, out):
    # fsdp2.yaml says 8 processes and bf16 for a GPU node; the flags override both, as users do.
    return ["accelerate", "launch", "--config_file", str(FSDP2), "--num_processes", "2", "--mixed_precision", "no",
            "-m", "protege.cli", "train", method, *args, "--grad_accum=1", f"--out_dir={out}"]


def _fsdp(method, args, out):
    proc = subprocess.run(_fsdp_cmd(method, args, out), capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def kill_once_checkpointed(cmd, out):
    """Start `cmd` (an accelerate launch writing to `out`); as soon as a checkpoint exists, SIGKILL the launcher
    and every rank; return that checkpoint's state.json."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "checkpoints").glob("step-*/state.json")):
        time.sleep(0.02)
    # torch's launcher starts each rank in a session of its own: kill the whole tree
    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    return json.loads(next((out / "checkpoints").glob("step-*/state.json")).read_text())


def _curve(out):
    rows = [json.loads(x) for x in open(Path(out) / "metrics.jsonl")]
    return [r["loss"] for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r]


def _weights(folder):
    from safetensors.torch import load_file

    (path,) = Path(folder).glob("*.safetensors")
    return load_file(str(path))


def _assert_same_weights(a, b, atol=1e-5):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert float((wa[k] - wb[k]).abs().max()) <= atol, k


def test_fsdp2_sft_lora_matches_one_process_and_resumes_after_kill_9(tmp_path, tiny_llama_dir):
    data = write_chats(tmp_path / "chats.jsonl", n=40)
    args = [f"--model={tiny_llama_dir}", f"--datasets=[{data}]", "--max_length=96", "--batch_size=2",
            "--max_steps=10", "--learning_rate=5e-3", "--lora.dropout=0.0", "--tensorboard=false",
            "--eval_fraction=0.1", "--save_every=2", "--precision=fp32"]
    _one("sft", args, tmp_path / "one")

    # All ranks killed with SIGKILL once a sharded checkpoint exists, then the same command again.
    out = tmp_path / "fsdp"
    killed_at = kill_once_checkpointed(_fsdp_cmd("sft", args, out), out)
    assert killed_at["format"] == "accelerate-fsdp2" and killed_at["processes"] == 2
    finished = (out / "manifest.json").exists()
    log = _fsdp("sft", args, out)
    if not finished:  # the kill landed mid-run (it nearly always does): the rerun resumed
        assert "resuming from checkpoint" in log

    assert_same_run(tmp_path / "one", out, 10, folder="adapter")
    assert not _weights(tmp_path / "one" / "adapter")["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].eq(0).all()


def method_args(tmp_path, model_dir, method):
    """(CLI args, trainer, output folder) of a 4-step run of `method` (sft, dpo, rm, full-sft) on tiny data."""
    from test_train_preference import write_pairs

    common = [f"--model={model_dir}", "--batch_size=2", "--max_steps=4", "--learning_rate=5e-3",
              "--lora.dropout=0.0", "--tensorboard=false", "--eval_fraction=0.1", "--save_every=0", "--precision=fp32"]
    if method in ("dpo", "rm"):
        args = [*common, f"--datasets=[{write_pairs(tmp_path / 'pairs.jsonl', n=40)}]", "--max_length=64"]
        if method == "dpo":
            return [*args, f"--reference_cache={tmp_path / 'ref'}"], "dpo", "adapter"
        return args, "rm", "model"
    args = [*common, f"--datasets=[{write_chats(tmp_path / 'chats.jsonl', n=40)}]", "--max_length=96"]
    if method == "full-sft":
        return [*args, "--method=full"], "sft", "model"
    return args, "sft", "adapter"


def assert_same_run(one, other, steps, atol=1e-5, folder=None):
    """`other` has the loss and held-out curves of `one` (to 1e-4, over `steps` steps, the loss falling) and,
    given `folder`, the same trained weights."""
    (loss1, eval1), (loss2, eval2) = _curve(one), _curve(other)
    assert len(loss1) == len(loss2) == steps and loss1[-1] < loss1[0]
    assert loss2 == pytest.approx(loss1, rel=1e-4)
    assert eval2 == pytest.approx(eval1, rel=1e-4)
    if folder:
        _assert_same_weights(Path(one) / folder, Path(other) / folder, atol=atol)


@pytest.mark.parametrize("method", ["dpo", "full-sft"])
def test_fsdp2_dpo_and_full_fine_tuning_match_one_process(tmp_path, tiny_llama_dir, method):
    args, trainer, folder = method_args(tmp_path, tiny_llama_dir, method)
    _one(trainer, args, tmp_path / "one")
    _fsdp(trainer, args, tmp_path / "fsdp")
    assert_same_run(tmp_path / "one", tmp_path / "fsdp", 4, folder=folder)
    if method == "full-sft":  # the gathered model is a plain transformers model again
        config = json.loads((tmp_path / "fsdp" / "model" / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]


def test_grpo_under_fsdp_is_refused_in_one_sentence(tmp_path, tiny_llama_dir):
    proc = subprocess.run(_fsdp_cmd("grpo", [f"--model={tiny_llama_dir}", "--prompts=task:arithmetic", "--max_steps=1"],
                                    tmp_path / "g"), capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode != 0
    assert "RL rollouts decode on each rank on its own" in proc.stderr
