"""`fit`: the one training loop every method (SFT, RM, DPO, ...) runs.

A method supplies its micro-batches (planned up front from the seed, addressed by index)
and a loss function `loss_fn(module, micro_batch) -> LossOutput`: a *sum* over the
micro-batch's units (labelled tokens, pairs), how many units it summed, and metric sums
over the same units. `fit` owns everything else, once:

  for each optimizer step: the ranks split the step's micro-batches (rank r takes every
  world-th); each backpropagates its loss sums (DDP syncs only on the last micro-batch);
  the step's unit count is summed over ranks; gradients are scaled by world / count (DDP
  averaged over ranks, we want the sum) -> clip -> AdamW -> schedule -> metrics.

Dividing by the count of the *whole step* after backward makes one process with gradient
accumulation and N processes give the same loss and update (to float rounding), for any
method, without the method knowing its normaliser before the forward pass. A rank with fewer
micro-batches in a short last step runs zero-weight ones, because every rank must join the
gradient all-reduce (and, under FSDP2, every forward: see `sharding.py`). DeepSpeed's engine averages and steps
inside backward, so there the step's count comes from the method (`units_of`) and divides each micro-batch's
loss before backward instead. Checkpoints carry a fingerprint of the config and a hash of
the data plan; a resume under a changed config is refused instead of silently mixing runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..errors import StageError
from ..manifest import StageRun
from ..precision import ResolvedPrecision, resolve_precision
from .settings import TrainSettings
from .sharding import (accelerator_options, enable_fsdp_on_cpu, is_deepspeed, load_sharded_checkpoint,
                       load_whole_under_zero3, refuse_unsupported_sharding, save_sharded_checkpoint, shard,
                       sharding_name)
from .state import (MetricsLogger, latest_checkpoint, load_checkpoint, make_optimizer, make_scheduler, peak_rss_mb,
                    save_checkpoint)

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

__all__ = ["LossOutput", "FitResult", "RunContext", "start_run", "pad_id", "fit", "evaluate", "run_logger"]


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # scalar: the loss summed over this micro-batch's units
    normaliser: float  # how many units (labelled tokens, pairs) the sum is over
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)  # sums over the same units


@dataclass
class FitResult:
    steps: int
    start_step: int
    loss: float  # last step's mean loss
    metrics: dict[str, float]  # last step's means
    eval: dict[str, float] | None  # final held-out means (eval_loss, eval_<metric>)
    tokens_per_s: float
    trainable_params: int
    stopped: bool  # ended early by stop_after_steps (checkpoint written; rerun resumes)
    peak_rss_mb: float


def run_logger(name: str, out_dir: Path, main: bool) -> Callable[[str], None]:
    """`[protege NAME] msg` on stderr and appended to out_dir/train.log (main process only)."""
    import sys

    def log(msg: str) -> None:
        if not main:
            return
        line = f"[protege {name}] {msg}"
        print(line, file=sys.stderr, flush=True)
        with (out_dir / "train.log").open("a", encoding="utf-8") as fh:
            fh.write(time.strftime("%Y-%m-%d %H:%M:%S ") + line + "\n")

    return log


@dataclass
class RunContext:
    accelerator: Accelerator
    main: bool  # this process writes files and logs
    world: int  # number of processes
    out_dir: Path
    log: Callable[[str], None]
    precision: ResolvedPrecision
    stage: StageRun  # config.yaml saved; `stage.finish(...)` writes the manifest last (main process only)

    def steps(self, config: TrainSettings, n_micro_batches: int) -> int:
        """Optimizer steps `fit` will take for this many planned micro-batches."""
        return config.max_steps or -(-n_micro_batches // (config.grad_accum * self.world))


def start_run(name: str, config: TrainSettings, *, rollouts: bool = False, stage: str | None = None) -> RunContext:
    """What every method does first: precision, accelerator (CPU unless CUDA is present), out_dir, logger, seed,
    and the stage's `StageRun` (the config saved now, the manifest at the end; `stage` names it, default `name`).

    `rollouts`: the method decodes with the policy during training (PPO, GRPO), which FSDP cannot shard."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from .state import set_seed

    cpu = not torch.cuda.is_available()
    precision = resolve_precision(config.precision, "cpu" if cpu else "cuda")
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision.mixed_precision:
        # accelerate keeps one precision per process; a pipeline (or RS's inner SFT) may run stages of
        # different precisions in one process. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=precision.mixed_precision, **accelerator_options(cpu))
    enable_fsdp_on_cpu(accelerator)
    load_whole_under_zero3(accelerator)
    refuse_unsupported_sharding(name, accelerator, rollouts=rollouts, quantization=config.quantization)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)
    main = accelerator.is_main_process
    log = run_logger(name, out_dir, main)
    log(f"precision {precision.name} ({precision.reason})"
        + (f", base quantized {config.quantization}" if config.quantization != "none" else "")
        + (", gradient checkpointing" if config.gradient_checkpointing else ""))
    return RunContext(accelerator, main, accelerator.num_processes, out_dir, log, precision,
                      StageRun(stage or name, config, out_dir, main=main))


def pad_id(tok: PreTrainedTokenizerBase) -> int:
    """The id that pads batches: the tokenizer's pad token, else EOS, else 0 (padding is never scored)."""
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def _as_float(x: torch.Tensor | float) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def _sums(out: LossOutput, keys: list[str], weight: float, device: torch.device | str) -> torch.Tensor:
    vals = [_as_float(out.loss_sum), out.normaliser, *(_as_float(out.metrics[k]) for k in keys)]
    return torch.tensor(vals, dtype=torch.float64, device=device) * weight


def _share(batches: Sequence[Any], rank: int, world: int) -> tuple[list[Any], list[float]]:
    """This rank's micro-batches (every world-th) and their weights, padded with zero-weight repeats so that
    every rank runs the same number: under FSDP each forward is a collective, and every rank must contribute
    to the gradient all-reduce and the metric reduce even when a short last step leaves it nothing."""
    mine = list(batches[rank::world])
    n = -(-len(batches) // world)
    return mine + [batches[0]] * (n - len(mine)), [1.0] * len(mine) + [0.0] * (n - len(mine))


def _means(total: torch.Tensor, keys: list[str], prefix: str = "") -> tuple[float, dict[str, float]]:
    n = float(total[1].clamp(min=1))
    return float(total[0]) / n, {f"{prefix}{k}": float(total[2 + i]) / n for i, k in enumerate(keys)}


@torch.no_grad()
def evaluate(module: torch.nn.Module, batches: Sequence[Any], loss_fn: Callable[[Any, Any], LossOutput],
             accelerator: Accelerator) -> dict[str, float] | None:
    """Unit-weighted means of the loss and metrics over held-out micro-batches, sharded over ranks."""
    if not batches:
        return None
    # Unwrapped: DDP's forward runs collectives (buffer broadcast), and ranks may get unequal shares.
    module = accelerator.unwrap_model(module)
    was_training = module.training
    module.eval()
    mine, weights = _share(batches, accelerator.process_index, accelerator.num_processes)
    from tqdm.auto import tqdm

    total, keys = None, None
    for mb, w in tqdm(list(zip(mine, weights)), desc="eval", unit="batch", leave=False,
                      disable=not accelerator.is_main_process, dynamic_ncols=True):
        with accelerator.autocast():
            out = loss_fn(module, mb)
        keys = keys if keys is not None else sorted(out.metrics)
        s = _sums(out, keys, w, accelerator.device)
        total = s if total is None else total + s
    total = accelerator.reduce(total, "sum")
    module.train(was_training)
    loss, metrics = _means(total, keys, prefix="eval_")
    return {"eval_loss": loss, **metrics}


def fit(name: str, config: TrainSettings, *, model: torch.nn.Module, module: torch.nn.Module, accelerator: Accelerator,
        out_dir: Path, micro_batches: Sequence[Any], loss_fn: Callable[[Any, Any], LossOutput],
        tokens_of: Callable[[Any], int], fingerprint: dict[str, Any], data_hash: str, unit: str = "units",
        eval_batches: Sequence[Any] = (), stop_after_steps: int | None = None,
        on_eval: Callable[[int, dict[str, float]], None] | None = None, progress: Sequence[str] = (),
        eval_fn: Callable[[Any, Any], LossOutput] | None = None, betas: tuple[float, float] = (0.9, 0.999),
        flops_per_token: float | None = None, peak_flops: float | None = None,
        on_step: Callable[[int], None] | None = None, units_of: Callable[[Any], float] | None = None) -> FitResult:
    """Train `model` (whose trainable parameters `module` uses; `module` is prepared by accelerate).

    Held-out batches are scored by `eval_fn` (default: `loss_fn` in eval mode); RL evaluates by decoding
    and scoring answers, not by its training loss.

    `progress` names step metrics shown beside the loss in the progress bar (RL: the mean reward and KL,
    which say more than a surrogate loss that sits near 0).

    `on_eval(step, results)` runs after every held-out evaluation (RL keeps its best-by-gold model there);
    `on_step(step)` after every optimizer step (RL tells a vLLM rollout engine its weights are stale).

    `micro_batches` is any sequence addressed by index (a list, or pretraining's lazily computed rows).
    With `flops_per_token` (and the device's `peak_flops`), model FLOPs/s and MFU are shown and logged.

    `units_of(micro_batch)`: the units its loss will sum over (what `loss_fn` returns as `normaliser`), known
    before the forward pass. DeepSpeed needs it: its engine averages and steps inside backward, so each
    micro-batch's loss is divided by the whole step's count first (see `sharding.py`).
    """
    from tqdm.auto import tqdm

    main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    log = run_logger(name, out_dir, main)
    # `precision: auto` may resolve differently on another machine: a checkpoint records what it ran in.
    fingerprint = {**fingerprint, "precision_resolved": accelerator.mixed_precision}
    sharding = sharding_name(accelerator)
    sharded, deepspeed = sharding is not None, is_deepspeed(accelerator)
    if sharded:  # a sharded checkpoint resumes only under the same sharding (and the other way round)
        fingerprint["sharding"] = sharding
    if deepspeed and units_of is None:
        raise StageError(f"{name}: this method does not declare its loss units before the forward pass, which "
                         "DeepSpeed needs (its engine steps inside backward); use FSDP2 (recipes/accelerate/fsdp2.yaml) "
                         "or DDP (recipes/accelerate/ddp.yaml)")
    ckpt_root = out_dir / "checkpoints"
    per_step = config.grad_accum * world
    if not micro_batches:
        raise StageError(f"{name}: nothing to train on (0 micro-batches)")
    # max_steps may be shorter than the plan (cut) or longer (the plan wraps around).
    total_steps = config.max_steps if config.max_steps is not None else math.ceil(len(micro_batches) / per_step)
    warmup = int(config.warmup_ratio * total_steps)
    optimizer = raw_optimizer = make_optimizer(model, config.learning_rate, config.weight_decay, betas)
    if sharded:  # the parameters become shards; accelerate moves the optimizer onto them (or wraps it in ZeRO)
        module, optimizer = shard(accelerator, module, optimizer, micro_batch=config.batch_size,
                                  max_grad_norm=config.max_grad_norm)
    engine = accelerator.deepspeed_engine_wrapped.engine if deepspeed else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Under DeepSpeed the schedule drives torch's AdamW inside the ZeRO optimizer (the one whose step runs).
    scheduler = make_scheduler(raw_optimizer if deepspeed else optimizer, config.schedule, warmup, total_steps,
                               config.decay_ratio)
    metrics = MetricsLogger(out_dir, enabled=main, tensorboard=config.tensorboard)

    # ---- resume --------------------------------------------------------------------------
    start_step = 0
    latest = latest_checkpoint(ckpt_root)
    if config.resume == "yes" and latest is None:
        raise StageError(f"{name}: resume requested but {ckpt_root} holds no checkpoint")
    if latest is not None and config.resume == "no":
        log(f"resume=no: ignoring and replacing checkpoints in {ckpt_root}")
        latest = None
    if latest is not None:
        saved = json.loads((latest / "state.json").read_text())
        if saved.get("fingerprint") != fingerprint or saved.get("data_hash") != data_hash:
            before = saved.get("fingerprint", {})
            changed = sorted(k for k in set(before) | set(fingerprint) if before.get(k) != fingerprint.get(k))
            raise StageError(f"{name}: {out_dir} holds a checkpoint ({latest.name}) of a different run "
                             f"(changed: {', '.join(changed or ['the data'])}); use another out_dir or resume=no "
                             "to start over")
        start_step = (load_sharded_checkpoint(accelerator, latest, scheduler) if sharded
                      else load_checkpoint(latest, model, optimizer, scheduler))["step"]
        metrics.truncate_after(start_step, final=start_step == total_steps)
        log(f"resuming from checkpoint {latest} at step {start_step}/{total_steps} (config unchanged)")
    elif main:
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)

    def checkpoint(step: int) -> None:
        state = {"fingerprint": fingerprint, "data_hash": data_hash,
                 "micro_batches_done": min(step * per_step, len(micro_batches))}
        if sharded:
            save_sharded_checkpoint(accelerator, ckpt_root, step, scheduler, state, keep=config.keep_checkpoints)
            return
        accelerator.wait_for_everyone()
        if main:
            save_checkpoint(ckpt_root, step, model, optimizer, scheduler, state, keep=config.keep_checkpoints)
        accelerator.wait_for_everyone()

    # ---- train -----------------------------------------------------------------------------
    bar = tqdm(total=total_steps, initial=start_step, desc=name, disable=not main, dynamic_ncols=True)
    tokens_seen, t0, stopped = 0, time.time(), False
    last_loss, last_metrics = float("nan"), {}
    for step in range(start_step, total_steps):
        first = (step * per_step) % len(micro_batches)  # a short last step at the plan's end, then it wraps
        mbs = [micro_batches[i] for i in range(first, min(first + per_step, len(micro_batches)))]
        mine, weights = _share(mbs, rank, world)
        # DeepSpeed: the whole step's units, before any forward (every rank plans the same step)
        step_units = float(sum(units_of(mb) for mb in mbs)) if engine is not None else 0.0
        total, keys = None, None
        for j, (mb, weight) in enumerate(zip(mine, weights)):
            last = j == len(mine) - 1
            sync = contextlib.nullcontext() if last or engine is not None else accelerator.no_sync(module)
            with sync:
                with accelerator.autocast():  # a no-op in fp32; the loss functions reduce in fp32 themselves
                    out = loss_fn(module, mb)
                if engine is None:
                    accelerator.backward(out.loss_sum * weight)
                else:  # divided up front: DeepSpeed averages the ranks' gradients (hence world) and steps itself
                    engine.set_gradient_accumulation_boundary(last)
                    engine.backward(out.loss_sum * (weight * world / max(step_units, 1.0)))
            keys = keys if keys is not None else sorted(out.metrics)
            s = _sums(out, keys, weight, accelerator.device)
            total = s if total is None else total + s
        total = accelerator.reduce(total, "sum")
        if engine is None:
            scale = world / max(float(total[1]), 1.0)  # DDP averaged the ranks' gradients; we want sum / count
            for p in trainable:
                if p.grad is not None:
                    p.grad.mul_(scale)
            grad_norm = (float(accelerator.clip_grad_norm_(trainable, config.max_grad_norm))
                         if config.max_grad_norm > 0 else float("nan"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            if abs(float(total[1]) - step_units) > 1e-6 * max(step_units, 1.0):
                raise StageError(f"{name}: the method declared {step_units:g} {unit} for step {step + 1} before the "
                                 f"forward pass but its losses summed over {float(total[1]):g} (a protege bug)")
            engine.step()  # clip to gradient_clipping (= max_grad_norm), AdamW, zero the gradients
            norm = engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else float("nan")
        scheduler.step()
        if on_step is not None:
            on_step(step + 1)
        last_loss, last_metrics = _means(total, keys)
        step_tokens = sum(tokens_of(mb) for mb in mbs)  # all ranks
        tokens_seen += step_tokens
        done = step + 1
        tok_s = tokens_seen / max(time.time() - t0, 1e-9)
        speed = {f"{unit}_s": round(tok_s, 2)}
        if flops_per_token:
            speed["tflops"] = round(tok_s * flops_per_token / 1e12, 4)
            if peak_flops:
                speed["mfu"] = round(tok_s * flops_per_token / peak_flops, 4)
        bar.set_postfix(loss=f"{last_loss:.4f}", **{k: f"{last_metrics[k]:.3f}" for k in progress if k in last_metrics},
                        **{k: (f"{v:.1f}" if v < 100 else f"{v:.0f}") if k == f"{unit}_s" else f"{v:.3g}"
                           for k, v in speed.items()})
        bar.update(1)
        if done % config.log_every == 0 or done == total_steps:
            metrics.log(done, loss=last_loss, **last_metrics, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                        tokens_per_s=round(tok_s, 2), tokens=step_tokens, **{unit: float(total[1])},
                        **{k: v for k, v in speed.items() if k in ("tflops", "mfu")})
        if config.eval_every and done % config.eval_every == 0 and done < total_steps:
            results = evaluate(module, eval_batches, eval_fn or loss_fn, accelerator)
            metrics.log(done, **(results or {}))
            if on_eval is not None and results is not None:
                on_eval(done, results)
        if done == stop_after_steps and done < total_steps:
            checkpoint(done)
            stopped = True
            break
        if config.save_every and done % config.save_every == 0 and done < total_steps:
            checkpoint(done)
    bar.close()
    tok_s = round(tokens_seen / max(time.time() - t0, 1e-9), 2)
    result = FitResult(total_steps, start_step, last_loss, last_metrics, None, tok_s,
                       sum(p.numel() for p in trainable), stopped, 0.0)
    if stopped:
        log(f"stopped after step {stop_after_steps} (checkpoint saved; rerun to resume)")
    else:
        if start_step < total_steps or latest_checkpoint(ckpt_root) is None:
            checkpoint(total_steps)
        result.eval = evaluate(module, eval_batches, eval_fn or loss_fn, accelerator)
        if result.eval is not None:
            metrics.log(total_steps, **result.eval)
            if on_eval is not None:
                on_eval(total_steps, result.eval)
    metrics.close()
    result.peak_rss_mb = round(peak_rss_mb(), 1)
    return result
