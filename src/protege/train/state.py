"""A training run's state and its parts: seeding, AdamW, LR schedule, checkpoints, metrics (the loop is `fit.py`).

Checkpoints hold no pickles: trainable weights as safetensors, optimizer/scheduler/RNG as a
tensors-only `torch.save` read back with `weights_only=True`, the data position as JSON.
A checkpoint folder is written under a temporary name and renamed, so a run killed with
`kill -9` leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import math
import random
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..files import atomic_dir, atomic_write_text, tolerant_jsonl

__all__ = ["set_seed", "make_optimizer", "lr_lambda", "make_scheduler", "trainable_state", "checkpoint_dirs",
           "prune_checkpoints", "save_checkpoint",
           "load_checkpoint", "latest_checkpoint", "MetricsLogger", "peak_rss_mb"]


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0,
              decay_ratio: float = 0.2) -> Callable[[int], float]:
    """LR multiplier per step: linear warmup from 0, then "linear" decay, "cosine" decay, "constant", or
    "wsd" (warmup-stable-decay: constant, then linear to 0 over the last `decay_ratio` of the steps)."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        if schedule == "wsd":
            decay_steps = max(1, round(decay_ratio * total_steps))
            return min(1.0, max(0.0, (total_steps - step) / decay_steps))
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_ratio + (1.0 - min_ratio) * decay

    return f


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int,
                   total_steps: int, decay_ratio: float = 0.2) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, warmup_steps, total_steps,
                                                                  decay_ratio=decay_ratio))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Name -> full CPU tensor of every parameter that trains (LoRA matrices, or everything in full fine-tuning).

    Under FSDP2 the parameters are DTensor shards, under ZeRO-3 DeepSpeed partitions: each is all-gathered here,
    so every rank must call this, in the same order (named_parameters is)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_id"):  # a ZeRO-3 partition: whole only inside GatheredParameters
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                out[n] = p.detach().cpu().clone()
            continue
        t = p.detach()
        out[n] = (t.full_tensor() if isinstance(t, DTensor) else t).cpu().contiguous()
    return out


def checkpoint_dirs(ckpt_root: str | Path, step: int) -> tuple[Path, Path]:
    """(`ckpt_root/step-N`, the temporary folder it is written in first). The temporary name must not match
    `step-*` (latest_checkpoint's glob) if a kill leaves it behind."""
    root = Path(ckpt_root)
    return root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"


def prune_checkpoints(ckpt_root: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for old in sorted(p for p in Path(ckpt_root).glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(ckpt_root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `ckpt_root/step-N/` atomically and keep only the newest `keep` checkpoints."""
    from safetensors.torch import save_file

    final, work = checkpoint_dirs(ckpt_root, step)
    with atomic_dir(final, tmp=work) as tmp:
        tensors = trainable_state(model)
        # safetensors refuses shared storage (tied weights in full fine-tuning); clone breaks the sharing.
        save_file({k: v.clone() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "python_rng": _py_rng_to_json()},
                                                   indent=2))
    prune_checkpoints(ckpt_root, keep)
    return final


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    done = sorted(p for p in Path(ckpt_root).glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from `path`; return its state.json."""
    from safetensors.torch import load_file

    path = Path(path)
    tensors = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise ValueError(f"{path}: checkpoint has parameters this model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    blob = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    state = json.loads((path / "state.json").read_text())
    _py_rng_from_json(state.pop("python_rng", None))
    return state


def _py_rng_to_json() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _py_rng_from_json(data: list[Any] | None) -> None:
    if data:
        random.setstate((data[0], tuple(data[1]), data[2]))


class MetricsLogger:
    """Append metrics to `metrics.jsonl` and, when available, TensorBoard event files."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional at runtime; the JSONL has everything
                self.tb = None

    def log(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def truncate_after(self, step: int, final: bool = False) -> None:
        """Drop rows logged after `step` (they belong to work a resume is about to redo); with `final` (the run
        resumes at its last step, where only the final evaluation is left to do) its evaluation rows too."""
        if not self.enabled or not self.path.exists():
            return
        # A line cut by the kill that made this a resume is dropped with the rows past `step`.
        rows = [r for r in tolerant_jsonl(self.path) if r.get("step", 0) < step
                or (r.get("step", 0) == step and not (final and any(k.startswith("eval_") for k in r)))]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
