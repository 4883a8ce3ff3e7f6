"""DeepSpeed ZeRO-2 and ZeRO-3 through accelerate on two CPU processes (gloo), launched with the shipped
recipes/accelerate/zero{2,3}.yaml.

DeepSpeed's engine averages gradients and steps the optimizer inside backward, so protege divides each
micro-batch's loss by the whole step's unit count before backward. The loss curve and trained weights must
still equal one process with the same global batch, and a run whose ranks are all killed with SIGKILL must
resume from DeepSpeed's checkpoint to the same end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_pretrain import _write_corpus, bpe, tok_dir  # noqa: F401  (fixtures)
from test_train_fsdp import ENV, ROOT, _curve, _one, _weights, assert_same_run, kill_once_checkpointed, method_args
from test_train_sft import write_chats

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.slow]
# DeepSpeed divides each micro-batch's loss before backward and reduces gradients in its own buckets: the
# weights after AdamW agree with one process to float rounding, a little looser than FSDP's 1e-5.
ATOL = 5e-5


def _ds_cmd(stage, method, args, out, grad_accum=1):
    # zero{2,3}.yaml say 8 processes and bf16 for a GPU node; the flags override both, as users do.
    return ["accelerate", "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / f"zero{stage}.yaml"),
            "--num_processes", "2", "--mixed_precision", "no", "-m", "protege.cli", "train", method, *args,
            f"--grad_accum={grad_accum}", f"--out_dir={out}"]


def _ds(stage, method, args, out, grad_accum=1):
    proc = subprocess.run(_ds_cmd(stage, method, args, out, grad_accum), capture_output=True, text=True, env=ENV,
                          timeout=600)
    assert proc.returncode == 0, "\n".join(x for x in proc.stderr.splitlines() if x.startswith("[rank0]"))[-3000:]
    return proc.stderr


def _grad_norms(out):
    """Per-step gradient norms before clipping: Adam's update barely moves under a constant gradient scale, the
    norm shows a wrong loss normalisation at once."""
    return [json.loads(x)["grad_norm"] for x in open(Path(out) / "metrics.jsonl") if '"grad_norm"' in x]


def _sft_args(tmp_path, steps=10):
    data = write_chats(tmp_path / "chats.jsonl", n=40)
    return [f"--model={tmp_path / 'tiny-llama'}", f"--datasets=[{data}]", "--max_length=96", "--batch_size=2",
            f"--max_steps={steps}", "--learning_rate=5e-3", "--lora.dropout=0.0", "--tensorboard=false",
            "--eval_fraction=0.1", "--save_every=2", "--precision=fp32"]


def test_zero2_sft_lora_matches_one_process_and_resumes_after_kill_9(tmp_path, tiny_llama_dir):
    args = _sft_args(tmp_path)
    _one("sft", args, tmp_path / "one")  # grad_accum 2 on one process = 2 processes x grad_accum 1

    out = tmp_path / "zero2"
    killed_at = kill_once_checkpointed(_ds_cmd(2, "sft", args, out), out)
    assert killed_at["format"] == "accelerate-zero2" and killed_at["processes"] == 2
    finished = (out / "manifest.json").exists()
    log = _ds(2, "sft", args, out)
    if not finished:  # the kill landed mid-run (it nearly always does): the rerun resumed
        assert "resuming from checkpoint" in log

    assert_same_run(tmp_path / "one", out, 10, atol=ATOL, folder="adapter")
    assert not _weights(out / "adapter")["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].eq(0).all()


@pytest.mark.parametrize("method", ["sft", "dpo", "rm", "full-sft"])
def test_zero3_matches_one_process(tmp_path, tiny_llama_dir, method):
    args, trainer, folder = method_args(tmp_path, tiny_llama_dir, method)
    _one(trainer, args, tmp_path / "one")  # one process x grad_accum 2 = two processes x grad_accum 1
    _ds(3, trainer, args, tmp_path / "zero3")
    assert_same_run(tmp_path / "one", tmp_path / "zero3", 4, atol=ATOL, folder=folder)
    assert _grad_norms(tmp_path / "zero3") == pytest.approx(_grad_norms(tmp_path / "one"), rel=1e-4)
    if method == "full-sft":  # the gathered model is a plain transformers model again
        config = json.loads((tmp_path / "zero3" / "model" / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]


def test_zero2_accumulates_micro_batches_like_one_process(tmp_path, tiny_llama_dir):
    """Two micro-batches per rank: DeepSpeed's accumulation boundary is protege's (only the last backward of a
    step is one); two processes x grad_accum 2 equal one process x grad_accum 4."""
    args = _sft_args(tmp_path, steps=4)
    one = subprocess.run([sys.executable, "-m", "protege.cli", "train", "sft", *args, "--grad_accum=4",
                          f"--out_dir={tmp_path / 'one'}"], capture_output=True, text=True, env=ENV, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    _ds(2, "sft", args, tmp_path / "zero2", grad_accum=2)
    assert_same_run(tmp_path / "one", tmp_path / "zero2", 4, atol=ATOL, folder="adapter")
    assert _grad_norms(tmp_path / "zero2") == pytest.approx(_grad_norms(tmp_path / "one"), rel=1e-4)


def test_zero3_pretraining_matches_one_process(tmp_path, tok_dir):  # noqa: F811  (the imported fixture)
    """Pretraining's held-out scoring calls the module's `hidden` and `loss` outside forward: under ZeRO-3 the
    LM head is gathered around them too (bits per byte equal one process's)."""
    corpus = _write_corpus(tmp_path / "c.txt", 200)
    args = [f"--datasets=[{corpus}]", f"--tokenizer={tok_dir}", "--depth=2", "--aspect_ratio=32", "--head_dim=16",
            "--max_length=64", "--batch_size=2", "--max_steps=6", "--learning_rate=3e-3", "--val_fraction=0.1",
            "--eval_tokens=1024", "--eval_every=3", "--tensorboard=false", "--save_every=0", "--precision=fp32"]
    _one("pretrain", args, tmp_path / "one")
    _ds(3, "pretrain", args, tmp_path / "zero3")
    assert len(_curve(tmp_path / "one")[1]) == 2  # two held-out scorings, each through hidden + loss
    assert_same_run(tmp_path / "one", tmp_path / "zero3", 6, atol=ATOL, folder="model")


def test_grpo_under_deepspeed_is_refused_in_one_sentence(tmp_path, tiny_llama_dir):
    proc = subprocess.run(_ds_cmd(2, "grpo", [f"--model={tiny_llama_dir}", "--prompts=task:arithmetic",
                                              "--max_steps=1"], tmp_path / "g"),
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode != 0
    assert "RL rollouts decode on each rank outside the DeepSpeed engine" in proc.stderr
