"""Sharded training: FSDP2 (`torch.distributed.fsdp.fully_shard`) through accelerate, as `fit` and the trainers use it.

`accelerate launch --config_file recipes/accelerate/fsdp2.yaml -m protege.cli train sft ...` shards the
trainer's module with accelerate's own FSDP2 preparation (`Accelerator.prepare_model`), so parameters,
gradients and AdamW state live 1/N on each rank. What FSDP changes for protege, and where it is handled:

- Every forward and backward is a collective (each layer's weights are all-gathered): ranks must run the same
  number of them. `fit` and `evaluate` pad a rank's share of a step with zero-weight micro-batches.
- Checkpoints are accelerate's sharded state (`save_state`: DCP shards of model and optimizer per rank) plus
  protege's `state.json`; a resume under another sharding is refused by the fingerprint.
- After training, `gather_trained` puts the full trained weights into a plain copy of the model on the main
  process, so saving, merging LoRA and scoring work as after a one-process run.

accelerate selects FSDP only on GPU-like devices: on CPU processes (gloo) it drops an FSDP config and runs
plain data parallelism. torch's `fully_shard` runs on gloo, so `enable_fsdp_on_cpu` switches accelerate onto
its FSDP path there: the same code a GPU run takes, which is also how protege tests it on CPU.

DeepSpeed is refused: its engine takes the optimizer step inside `backward`, before `fit` can divide the
step's gradient by its unit count summed over ranks (what makes N ranks equal one process).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import StageError
from .state import checkpoint_dirs, prune_checkpoints, trainable_state

__all__ = ["is_sharded", "enable_fsdp_on_cpu", "refuse_unsupported_sharding", "prepare_module",
           "shard", "gather_trained", "save_sharded_checkpoint", "load_sharded_checkpoint", "SHARDED_FORMAT"]

SHARDED_FORMAT = "accelerate-fsdp2"


def _kind(distributed_type: Any) -> str:
    return str(getattr(distributed_type, "value", distributed_type)).upper()


def is_sharded(accelerator: Any) -> bool:
    """True when the model's parameters are DTensor shards (FSDP2): collectives rule forward, save and load."""
    return _kind(accelerator.distributed_type) == "FSDP"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def enable_fsdp_on_cpu(accelerator: Any) -> None:
    """Run accelerate's FSDP2 path on CPU processes when the launch config asks for FSDP (see module docstring)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.device.type != "cpu" or not _env_true("ACCELERATE_USE_FSDP") or accelerator.num_processes < 2:
        return
    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP and getattr(state, "fsdp_plugin", None) is not None:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables `accelerate launch` sets
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def refuse_unsupported_sharding(name: str, accelerator: Any, *, rollouts: bool = False,
                                quantization: str = "none") -> None:
    """One sentence for each accelerate config a trainer cannot honour, before any work is done."""
    kind = _kind(accelerator.distributed_type)
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise StageError(f"{name}: this accelerate config asks for {kind}, which protege's trainers do not run "
                         "(DeepSpeed's engine steps the optimizer inside backward, before protege divides the "
                         "step's gradient by its token count over all ranks); use the FSDP2 config "
                         "(recipes/accelerate/fsdp2.yaml), which shards parameters, gradients and optimizer "
                         "state as ZeRO-3 does, or QLoRA (quantization: nf4) on one GPU")
    if kind != "FSDP":
        return
    version = getattr(getattr(accelerator.state, "fsdp_plugin", None), "fsdp_version", 2)
    if version != 2:
        raise StageError(f"{name}: this accelerate config asks for FSDP version {version}; protege runs FSDP2 "
                         "(fully_shard): set `fsdp_version: 2` under fsdp_config (recipes/accelerate/fsdp2.yaml)")
    if rollouts:
        raise StageError(f"{name}: RL rollouts decode on each rank on its own, and under FSDP every forward is a "
                         "collective all ranks must join in step; run PPO/GRPO on one process or with DDP "
                         "(recipes/accelerate/ddp.yaml)")
    if quantization != "none":
        raise StageError(f"{name}: quantization: {quantization} with FSDP is not supported by protege yet; "
                         "use QLoRA on one process, or FSDP2 with a bf16 base")


def prepare_module(accelerator: Any, module: torch.nn.Module, forward_methods: tuple[str, ...] = ()) -> Any:
    """A trainer's wrapper around a transformers model, ready for `fit`: wrapped by DDP now, or, under FSDP2,
    returned as it is for `fit` to shard together with its optimizer (`shard`: accelerate prepares FSDP2
    models only with their optimizer). `forward_methods`: methods other than `forward` that run the model,
    around which FSDP must gather the weights too."""
    if not is_sharded(accelerator):
        return accelerator.prepare_model(module)
    module._fsdp_forward_methods = tuple(forward_methods)
    return module


def shard(accelerator: Any, module: torch.nn.Module, optimizer: Any) -> tuple[Any, Any]:
    """FSDP2 through `accelerator.prepare(module, optimizer)`: one shard group per decoder layer and one for
    the rest; the optimizer is moved onto the sharded parameters.

    accelerate's transformer-based auto-wrap reads the layer classes from the top module's `_no_split_modules`,
    which only the transformers model inside protege's wrapper has."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    plugin = accelerator.state.fsdp_plugin
    if plugin.transformer_cls_names_to_wrap is None:
        names = {n for m in module.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
        plugin.transformer_cls_names_to_wrap = sorted(names) or None
    methods = getattr(module, "_fsdp_forward_methods", ())
    module, optimizer = accelerator.prepare(module, optimizer)
    for method in methods:
        register_fsdp_forward_method(module, method)
    return module, optimizer


def gather_trained(accelerator: Any, model: torch.nn.Module, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """The trained model as a plain module on the main process (every rank must call this).

    Without sharding this is `model` itself. Under FSDP2 the main process builds a fresh copy of the same
    model (`build`: the base loaded again, with the same LoRA adapters) and copies in the gathered trainable
    weights; frozen weights are the base's own. Other ranks get `model` back and must not use it alone."""
    if not is_sharded(accelerator):
        return model
    trained = trainable_state(model)
    plain = build() if accelerator.is_main_process else model
    if accelerator.is_main_process:
        params = dict(plain.named_parameters())
        missing = sorted(set(trained) - set(params))
        if missing:
            raise StageError(f"gathering the sharded model: the rebuilt copy lacks {missing[:3]}")
        with torch.no_grad():
            for n, t in trained.items():
                params[n].copy_(t.to(params[n].dtype))
    accelerator.wait_for_everyone()
    return plain


def save_sharded_checkpoint(accelerator: Any, ckpt_root: Path, step: int, scheduler: Any, state: dict[str, Any],
                            keep: int) -> Path:
    """accelerate's sharded state of every rank in `ckpt_root/step-N/`, written under a temporary name and
    renamed by the main process once all ranks are done (a kill leaves the previous checkpoint intact)."""
    final, tmp = checkpoint_dirs(ckpt_root, step)
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # model and optimizer shards (DCP), RNG of every rank
    accelerator.wait_for_everyone()
    if main:
        torch.save({"scheduler": scheduler.state_dict()}, tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "format": SHARDED_FORMAT,
                                                    "processes": accelerator.num_processes}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        prune_checkpoints(ckpt_root, keep)
    accelerator.wait_for_everyone()
    return final


def load_sharded_checkpoint(accelerator: Any, path: Path, scheduler: Any) -> dict[str, Any]:
    """Restore what `save_sharded_checkpoint` wrote (every rank calls); return its state.json."""
    state = json.loads((path / "state.json").read_text())  # fit's fingerprint check already matched `sharding`
    accelerator.load_state(str(path))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True)["scheduler"])
    return state
