"""One `precision` setting for every path that runs a model: `auto | fp32 | bf16 | fp16`.

`auto` picks bf16 where the device has units that run it fast and fp32 elsewhere:
- CUDA: bf16 when the GPU supports it (Ampere and newer), else fp32 (fp16 is never chosen for you:
  it needs loss scaling and overflows where bf16 does not).
- CPU: bf16 when it has AMX-BF16 tiles or AVX512-BF16 (`torch.cpu` asks CPUID). With torch 2.13 a
  bf16 matmul ran ~8x faster than fp32 on an AMX machine and ~3x on an AVX512-BF16 one without AMX
  ((512 x 640) . (640 x 262,144): 484 vs 1,437 ms, 2 threads); an AVX2-only CPU emulates bf16 and is
  slower in it than in fp32.
- anything else (MPS, XPU, ...): fp32.

What the resolved precision means is the same everywhere (accelerate's mixed-precision rules):
frozen weights are stored in it; trainable parameters (LoRA, trainable token rows, value and score
heads, full fine-tuning's master weights) and optimizer state stay fp32; matmuls run under autocast;
losses, log-probs, KL and rewards are reduced in fp32. The choice and why go into every manifest.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .errors import StageError

if TYPE_CHECKING:
    import torch

__all__ = ["Precision", "ResolvedPrecision", "resolve_precision", "cpu_bf16_units", "upcast_trainable"]

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISION_HELP = ("auto (bf16 where the device runs it fast: CUDA with bf16, a CPU with AMX-BF16 or "
                  "AVX512-BF16; fp32 elsewhere) | fp32 | bf16 | fp16 (GPU only)")
# torch is imported where a dtype or device is needed, not here: configs import this module, and
# `protege --help` should not pay ~1.2 s for torch.
_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Spellings people bring from transformers / vLLM / accelerate configs.
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "no": "fp32", "fp32": "fp32",
            "bf16": "bf16", "fp16": "fp16", "auto": "auto"}


@dataclass(frozen=True)
class ResolvedPrecision:
    name: Literal["fp32", "bf16", "fp16"]
    requested: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, _TORCH_NAMES[self.name])

    @property
    def torch_name(self) -> str:
        """The name `models.load` and transformers' `dtype=` take ("float32", "bfloat16", "float16")."""
        return _TORCH_NAMES[self.name]

    @property
    def cache_tag(self) -> list[str]:
        """What a cache key (teacher answers, bench items, reference log-probs) adds for this precision:
        nothing for fp32, so caches written before precision existed stay valid; the name otherwise."""
        return [] if self.name == "fp32" else [self.name]

    @property
    def mixed_precision(self) -> str:
        """accelerate's spelling: "no" | "bf16" | "fp16"."""
        return "no" if self.name == "fp32" else self.name

    def manifest(self) -> dict[str, str]:
        return {"precision": self.name, "requested": self.requested, "reason": self.reason}


@functools.cache
def cpu_bf16_units() -> tuple[str, ...]:
    """The CPU's bf16 matrix/vector units ("amx_bf16", "avx512_bf16"), detected once."""
    import torch

    found = []
    probes = (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    for flag, probe in probes:
        fn = getattr(torch.cpu, probe, None)
        if fn is not None:
            if fn():
                found.append(flag)
        elif flag in _proc_cpu_flags():  # older torch: read the kernel's view
            found.append(flag)
    return tuple(found)


def _proc_cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _device_type(device: str | torch.device | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def resolve_precision(precision: str, device: str | torch.device | None = None) -> ResolvedPrecision:
    """`auto` -> the fastest exact-enough precision for `device` (default: CUDA if present, else CPU),
    with the reason; an explicit choice is checked against the device."""
    import torch

    requested = _ALIASES.get(str(precision).lower())
    if requested is None:
        raise StageError(f"precision: {precision!r} is not one of auto, fp32, bf16, fp16")
    kind = _device_type(device)
    env = os.environ.get("PROTEGE_PRECISION", "").strip()
    if requested == "auto" and env and env.lower() != "auto":
        # A machine-wide choice for `auto` (as ACCELERATE_MIXED_PRECISION is accelerate's); the test suite
        # pins fp32 with it so its exactness checks compare like with like.
        forced = resolve_precision(env, device)
        return ResolvedPrecision(forced.name, "auto", f"PROTEGE_PRECISION={env}")
    if requested == "auto":
        if kind == "cuda":
            if torch.cuda.is_bf16_supported():
                return ResolvedPrecision("bf16", "auto", f"CUDA device {torch.cuda.get_device_name()} supports bf16")
            return ResolvedPrecision("fp32", "auto", "this CUDA device has no bf16 support")
        if kind == "cpu":
            units = cpu_bf16_units()
            if units:
                return ResolvedPrecision("bf16", "auto", f"CPU has {' and '.join(units)}")
            return ResolvedPrecision("fp32", "auto", "CPU has neither AMX-BF16 nor AVX512-BF16 (bf16 would be emulated)")
        return ResolvedPrecision("fp32", "auto", f"no fast-bf16 rule for device type {kind!r}")
    if requested == "fp16" and kind == "cpu":
        raise StageError("precision fp16 runs on a GPU only (CPUs have no fast fp16 path and no loss scaling "
                         "here); use bf16 or fp32")
    if requested == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise StageError("precision bf16: this CUDA device does not support bf16; use fp16 or fp32")
    return ResolvedPrecision(requested, requested, "requested")  # type: ignore[arg-type]


def upcast_trainable(model: torch.nn.Module) -> int:
    """Trainable parameters in bf16/fp16 -> fp32 (master weights and AdamW state stay fp32); returns
    how many were cast. Frozen weights keep their low-precision storage."""
    import torch

    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
            n += 1
    return n
