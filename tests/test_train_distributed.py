"""Two CPU processes (accelerate launch, gloo) give the loss curve of one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from test_train_sft import write_chats


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, tiny_llama_dir):
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate CLI not installed")
    data = write_chats(tmp_path / "chats.jsonl", n=40)
    common = [f"--model={tiny_llama_dir}", f"--datasets=[{data}]", "--max_length=96", "--batch_size=2",
              "--max_steps=5", "--learning_rate=5e-3", "--lora.dropout=0.0", "--tensorboard=false",
              "--eval_fraction=0.1", "--save_every=0"]
    (loss1, eval1), (loss2, eval2) = _one_vs_two(tmp_path, "sft", common)
    assert len(loss1) == len(loss2) == 5
    assert loss2 == pytest.approx(loss1, rel=1e-4)
    assert eval2 == pytest.approx(eval1, rel=1e-4)
    assert loss1[-1] < loss1[0]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "rm"])
def test_preference_methods_two_processes_match_one(tmp_path, tiny_llama_dir, method):
    """The shared fit loop gives RM and DPO the same 2-process == 1-process guarantee as SFT."""
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate CLI not installed")
    from test_train_preference import write_pairs

    data = write_pairs(tmp_path / "pairs.jsonl", n=40)
    common = [f"--model={tiny_llama_dir}", f"--datasets=[{data}]", "--max_length=64", "--batch_size=2",
              "--max_steps=4", "--learning_rate=5e-3", "--lora.dropout=0.0", "--tensorboard=false",
              "--eval_fraction=0.1", "--save_every=0", f"--reference_cache={tmp_path / 'ref'}"]
    if method == "rm":
        common = common[:-1]
    (loss1, eval1), (loss2, eval2) = _one_vs_two(tmp_path, method, common)
    assert len(loss1) == len(loss2) == 4
    assert loss2 == pytest.approx(loss1, rel=1e-4)
    assert eval2 == pytest.approx(eval1, rel=1e-4)


def _one_vs_two(tmp_path, method, common):
    """Loss and eval-loss curves of one process with grad_accum=2 and two gloo processes with grad_accum=1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    one = subprocess.run([sys.executable, "-m", "protege.cli", "train", method, *common, "--grad_accum=2",
                          f"--out_dir={tmp_path / 'one'}"], capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    # No GPU here: `--multi_gpu` only picks the torchrun launcher; accelerate then runs DDP over gloo on CPU.
    two = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "protege.cli", "train", method,
                          *common, "--grad_accum=1", f"--out_dir={tmp_path / 'two'}"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 process(es)" in two.stderr

    def curve(name):
        rows = [json.loads(x) for x in open(tmp_path / name / "metrics.jsonl")]
        return [r["loss"] for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r]

    return curve("one"), curve("two")


def test_configs_protege_cannot_honour_are_refused_in_one_sentence():
    """Megatron-LM, FSDP1, quantized bases and RL rollouts under FSDP or DeepSpeed, ZeRO stage 0 and DeepSpeed's
    own gradient accumulation are refused with the working alternative. (The configs that run are run for real
    in test_train_fsdp.py and test_train_deepspeed.py; the refusals are checked directly.)"""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from protege.errors import StageError
    from protege.train.sharding import refuse_unsupported_sharding

    def acc(kind, version=2, stage=3, gas="auto"):
        ds = SimpleNamespace(zero_stage=stage, deepspeed_config={"gradient_accumulation_steps": gas})
        return SimpleNamespace(distributed_type=DistributedType[kind],
                               state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version),
                                                     deepspeed_plugin=ds))

    with pytest.raises(StageError, match="Megatron-LM.*zero3.yaml.*fsdp2.yaml"):
        refuse_unsupported_sharding("sft", acc("MEGATRON_LM"))
    with pytest.raises(StageError, match="FSDP version 1.*fsdp_version: 2"):
        refuse_unsupported_sharding("sft", acc("FSDP", 1))
    for kind in ("FSDP", "DEEPSPEED"):
        with pytest.raises(StageError, match="RL rollouts.*ddp.yaml"):
            refuse_unsupported_sharding("grpo", acc(kind), rollouts=True)
    with pytest.raises(StageError, match="nf4 with FSDP"):
        refuse_unsupported_sharding("sft", acc("FSDP"), quantization="nf4")
    with pytest.raises(StageError, match="nf4 with DeepSpeed"):
        refuse_unsupported_sharding("sft", acc("DEEPSPEED"), quantization="nf4")
    with pytest.raises(StageError, match="zero_stage 0.*ddp.yaml"):
        refuse_unsupported_sharding("sft", acc("DEEPSPEED", stage=0))
    with pytest.raises(StageError, match="gradient_accumulation_steps 4.*grad_accum"):
        refuse_unsupported_sharding("sft", acc("DEEPSPEED", gas=4))
    for ok in ("FSDP", "MULTI_CPU", "NO", "DEEPSPEED"):
        refuse_unsupported_sharding("sft", acc(ok))
    for stage in (1, 2):
        refuse_unsupported_sharding("dpo", acc("DEEPSPEED", stage=stage, gas=1))
