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

DeepSpeed ZeRO (stages 1-3, `recipes/accelerate/zero{2,3}.yaml`) runs through accelerate's DeepSpeed
preparation too. Its engine steps the optimizer itself and averages gradients inside backward, so `fit` cannot
divide the step's gradient by the unit count afterwards as it does for DDP and FSDP: a method hands `fit` its
units per micro-batch (`units_of`), and each micro-batch's loss is divided by the whole step's count before
backward. Under ZeRO-3 a module that reads a weight directly (the chunked LM head, trainable-token rows) has
that weight registered with DeepSpeed as an external parameter, so it is gathered for forward and backward.
accelerate enables DeepSpeed only when not told `cpu=True`, and on a machine without GPUs finds no process-group
backend: `accelerator_options` names gloo, DeepSpeed's own CPU fallback, so the same code runs on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..errors import StageError
from .state import checkpoint_dirs, prune_checkpoints, trainable_state

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["is_sharded", "is_deepspeed", "sharding_name", "accelerator_options", "load_whole_under_zero3",
           "enable_fsdp_on_cpu", "direct_weights", "refuse_unsupported_sharding", "prepare_module",
           "shard", "gather_trained", "save_sharded_checkpoint", "load_sharded_checkpoint"]



def _kind(distributed_type: Any) -> str:
    return str(getattr(distributed_type, "value", distributed_type)).upper()


def is_sharded(accelerator: Accelerator) -> bool:
    """True when the model's parameters are DTensor shards (FSDP2): collectives rule forward, save and load."""
    return _kind(accelerator.distributed_type) == "FSDP"


def is_deepspeed(accelerator: Accelerator) -> bool:
    """True under DeepSpeed: its engine owns backward, gradient averaging, clipping and the optimizer step."""
    return _kind(accelerator.distributed_type) == "DEEPSPEED"


def _zero_stage(accelerator: Accelerator) -> int:
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def sharding_name(accelerator: Accelerator) -> str | None:
    """`fsdp2`, `zero1`..`zero3`, or None (one process, DDP): recorded in checkpoints, which resume only under it."""
    if is_sharded(accelerator):
        return "fsdp2"
    if is_deepspeed(accelerator):
        return f"zero{_zero_stage(accelerator)}"
    return None


def accelerator_options(cpu: bool) -> dict[str, Any]:
    """Keyword arguments for `Accelerator`: `cpu`, except under a DeepSpeed launch on CPU processes (module docstring)."""
    if cpu and _env_true("ACCELERATE_USE_DEEPSPEED") and "LOCAL_RANK" in os.environ:
        from accelerate.utils import InitProcessGroupKwargs

        return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": cpu}


def load_whole_under_zero3(accelerator: Accelerator) -> None:
    """protege loads models whole on every rank and the DeepSpeed engine partitions them (zero3_init_flag is not
    used): clear the ZeRO-3 flag accelerate hands transformers, or PEFT's trainable-token setup would run
    ZeRO-3 collectives (and assume CUDA) on weights that are not partitioned, and the main process's rebuild of
    the trained model (`gather_trained`) would wait on a collective the other ranks never join."""
    if is_deepspeed(accelerator):
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def enable_fsdp_on_cpu(accelerator: Accelerator) -> None:
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


def refuse_unsupported_sharding(name: str, accelerator: Accelerator, *, rollouts: bool = False,
                                quantization: str = "none") -> None:
    """One sentence for each accelerate config a trainer cannot honour, before any work is done."""
    kind = _kind(accelerator.distributed_type)
    if kind == "MEGATRON_LM":
        raise StageError(f"{name}: this accelerate config asks for Megatron-LM, which protege's trainers do not run; "
                         "use DeepSpeed ZeRO (recipes/accelerate/zero3.yaml) or FSDP2 (recipes/accelerate/fsdp2.yaml)")
    if kind == "DEEPSPEED":
        _refuse_deepspeed(name, accelerator, rollouts, quantization)
        return
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


def _refuse_deepspeed(name: str, accelerator: Accelerator, rollouts: bool, quantization: str) -> None:
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    stage = _zero_stage(accelerator)
    if stage not in (1, 2, 3):
        raise StageError(f"{name}: this DeepSpeed config has zero_stage {stage}; protege runs ZeRO stages 1, 2 and 3 "
                         "(for plain data parallelism use recipes/accelerate/ddp.yaml)")
    if ds.get("gradient_accumulation_steps", "auto") not in ("auto", 1):
        raise StageError(f"{name}: the DeepSpeed config sets gradient_accumulation_steps "
                         f"{ds['gradient_accumulation_steps']}; set it to 1 (or auto) and use protege's grad_accum, "
                         "which counts micro-batches and marks the step boundary for DeepSpeed")
    if rollouts:
        raise StageError(f"{name}: RL rollouts decode on each rank outside the DeepSpeed engine, which protege does "
                         "not support; run PPO/GRPO on one process or with DDP (recipes/accelerate/ddp.yaml)")
    if quantization != "none":
        raise StageError(f"{name}: quantization: {quantization} with DeepSpeed is not supported by protege; use QLoRA "
                         "on one process, or ZeRO with a bf16 base")


def prepare_module(accelerator: Accelerator, module: torch.nn.Module, forward_methods: tuple[str, ...] = ()) -> Any:
    """A trainer's wrapper around a transformers model, ready for `fit`: wrapped by DDP now, or, under FSDP2 and
    DeepSpeed, returned as it is for `fit` to shard together with its optimizer (`shard`: accelerate prepares
    both only with their optimizer). `forward_methods`: methods other than `forward` that run the model,
    around which the sharded weights must be gathered too."""
    if sharding_name(accelerator) is None:
        return accelerator.prepare_model(module)
    module._sharded_forward_methods = tuple(forward_methods)
    return module


def shard(accelerator: Accelerator, module: torch.nn.Module, optimizer: torch.optim.Optimizer, *, micro_batch: int,
          max_grad_norm: float) -> tuple[Any, Any]:
    """FSDP2 or DeepSpeed through `accelerator.prepare(module, optimizer)`.

    FSDP2: one shard group per decoder layer and one for the rest; the optimizer is moved onto the sharded
    parameters. accelerate's transformer-based auto-wrap reads the layer classes from the top module's
    `_no_split_modules`, which only the transformers model inside protege's wrapper has."""
    if is_deepspeed(accelerator):
        return _deepspeed(accelerator, module, optimizer, micro_batch, max_grad_norm)
    from torch.distributed.fsdp import register_fsdp_forward_method

    plugin = accelerator.state.fsdp_plugin
    if plugin.transformer_cls_names_to_wrap is None:
        names = {n for m in module.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
        plugin.transformer_cls_names_to_wrap = sorted(names) or None
    methods = getattr(module, "_sharded_forward_methods", ())
    module, optimizer = accelerator.prepare(module, optimizer)
    for method in methods:
        register_fsdp_forward_method(module, method)
    return module, optimizer


def _deepspeed(accelerator: Accelerator, module: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batch: int,
               max_grad_norm: float) -> tuple[Any, Any]:
    """The DeepSpeed engine around `module`, configured from protege's own settings where the config says `auto`.

    protege's train config decides clipping (`max_grad_norm`) and accumulation (`grad_accum`, with the step
    boundary marked by `fit`), so DeepSpeed's own accumulation stays at 1. The micro-batch size only feeds
    DeepSpeed's batch-size bookkeeping: protege's micro-batches are planned by the method."""
    import deepspeed

    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    for key, value in (("train_micro_batch_size_per_gpu", micro_batch), ("gradient_accumulation_steps", 1)):
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * accelerator.num_processes
    ds["gradient_clipping"] = max(max_grad_norm, 0.0)
    # ZeRO-Offload defaults to DeepSpeed's own CPU Adam; protege hands in torch's AdamW, which runs there as well.
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    methods = getattr(module, "_sharded_forward_methods", ())
    module, optimizer = accelerator.prepare(module, optimizer)
    if _zero_stage(accelerator) == 3:
        inner = accelerator.unwrap_model(module)
        external = direct_weights(inner)
        for p in external:  # gathered around the top module's forward and backward, not just their own module's
            deepspeed.zero.register_external_parameter(inner, p)
        for name in methods:  # outside forward (held-out scoring, no grad): gather them around the call
            setattr(inner, name, _gathered(getattr(inner, name), external))
    return module, optimizer


def direct_weights(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters protege's losses read directly instead of calling their module: the LM head (chunked loss)
    and the input embeddings (trainable-token rows), with their PEFT token adapters."""
    model = getattr(module, "model", module)
    found: dict[int, torch.nn.Parameter] = {}
    for get in ("get_output_embeddings", "get_input_embeddings"):
        part = getattr(model, get, lambda: None)()
        for p in (part.parameters() if part is not None else ()):
            found.setdefault(id(p), p)
    return list(found.values())


def _gathered(method: Callable[..., Any], params: list[torch.nn.Parameter]) -> Callable[..., Any]:
    import deepspeed

    def call(*args: Any, **kwargs: Any) -> Any:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=not torch.is_grad_enabled()):
            return method(*args, **kwargs)

    return call


def gather_trained(accelerator: Accelerator, model: torch.nn.Module, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """The trained model as a plain module on the main process (every rank must call this).

    Without sharding (and under ZeRO-1/2, which keep every weight whole on every rank) this is `model` itself.
    Under FSDP2 and ZeRO-3 the main process builds a fresh copy of the same model (`build`: the base loaded
    again, with the same LoRA adapters) and copies in the gathered trainable weights; frozen weights are the
    base's own. Other ranks get `model` back and must not use it alone."""
    if sharding_name(accelerator) not in ("fsdp2", "zero3"):
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


def save_sharded_checkpoint(accelerator: Accelerator, ckpt_root: Path, step: int, scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict[str, Any],
                            keep: int) -> Path:
    """accelerate's sharded state of every rank in `ckpt_root/step-N/`, written under a temporary name and
    renamed by the main process once all ranks are done (a kill leaves the previous checkpoint intact).
    DeepSpeed leaves out the frozen weights (a LoRA run would otherwise write the whole base every time)."""
    final, tmp = checkpoint_dirs(ckpt_root, step)
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # model and optimizer shards (DCP, or DeepSpeed's ZeRO files), RNG of every rank
    accelerator.save_state(str(tmp), **({"exclude_frozen_parameters": True} if is_deepspeed(accelerator) else {}))
    accelerator.wait_for_everyone()
    if main:
        torch.save({"scheduler": scheduler.state_dict()}, tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "format": f"accelerate-{sharding_name(accelerator)}",
                                                    "processes": accelerator.num_processes}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        prune_checkpoints(ckpt_root, keep)
    accelerator.wait_for_everyone()
    return final


def load_sharded_checkpoint(accelerator: Accelerator, path: Path, scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """Restore what `save_sharded_checkpoint` wrote (every rank calls); return its state.json."""
    state = json.loads((path / "state.json").read_text())  # fit's fingerprint check already matched `sharding`
    accelerator.load_state(str(path), **({"load_module_strict": False} if is_deepspeed(accelerator) else {}))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True)["scheduler"])
    return state
