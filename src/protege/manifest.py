"""`manifest.json`: what a stage did, so outputs describe themselves and reruns can be skipped.

A manifest holds the stage name, the resolved config, every input path with its
sha256, the outputs, counts, wall seconds and package versions.
"""

from __future__ import annotations

import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .files import atomic_write_json, sha256_path
from .outputs import MANIFEST

__all__ = ["write_manifest", "package_versions", "hardware", "Timer", "find_in_manifests",
           "StageRun"]

_PACKAGES = ("protege", "torch", "transformers", "peft", "accelerate", "datasets")


def find_in_manifests(paths: list[str], key: str) -> list[Any]:
    """Every value stored under `key` (at any depth) in the manifest.json beside each of `paths` (a stage's
    output file or folder): how a later stage reads back what an earlier one decided, e.g. curate's markers."""
    found: list[Any] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == key:
                    found.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for p in paths:
        path = Path(p)
        manifest = (path if path.is_dir() else path.parent) / "manifest.json"
        if manifest.is_file():
            try:
                walk(json.loads(manifest.read_text()))
            except ValueError:
                continue
    return found


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def hardware() -> dict[str, Any]:
    """What ran the stage: timings and `precision: auto` depend on it (bf16 units, GPU, threads)."""
    import torch

    from .precision import cpu_bf16_units

    info: dict[str, Any] = {"cpu_bf16_units": list(cpu_bf16_units()), "torch_threads": torch.get_num_threads(),
                            "machine": platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _precision_settings(cfg: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Every `precision` setting in a config dump, as (dotted path, value), outermost first."""
    if not isinstance(cfg, dict):
        return []
    found = [(f"{prefix}precision", cfg["precision"])] if isinstance(cfg.get("precision"), str) else []
    for key, value in cfg.items():
        found += _precision_settings(value, f"{prefix}{key}.")
    return found


def write_manifest(
    out_dir: str | Path,
    stage: str,
    config: BaseModel | dict[str, Any] | None = None,
    inputs: list[str | Path] | None = None,
    outputs: list[str | Path] | None = None,
    counts: dict[str, Any] | None = None,
    seconds: float | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `out_dir/manifest.json` (atomically) and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = config.model_dump(mode="json") if isinstance(config, BaseModel) else (config or {})
    manifest = {
        "stage": stage,
        "config": cfg,
        "inputs": [{"path": str(p), "sha256": sha256_path(p)} for p in (inputs or []) if Path(p).exists()],
        "outputs": [str(p) for p in (outputs or [])],
        "counts": counts or {},
        "seconds": None if seconds is None else round(seconds, 3),
        "versions": package_versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    manifest["hardware"] = hardware()
    settings = _precision_settings(cfg)
    if settings:
        from .errors import StageError
        from .precision import resolve_precision

        # The stage's own `precision`, else the first nested one (a generator's teacher, a judge).
        where, precision = next(((k, v) for k, v in settings if k == "precision"), settings[0])
        try:
            manifest["precision"] = resolve_precision(precision).manifest()
        except StageError as err:  # a stage that ran never gets here with an impossible choice
            manifest["precision"] = {"precision": precision, "error": str(err)}
        if where != "precision":
            manifest["precision"]["setting"] = where
    if extra:
        manifest.update(extra)
    path = out_dir / MANIFEST
    return atomic_write_json(path, manifest)


class Timer:
    """`with Timer() as t: ...; t.seconds`"""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.start


class StageRun:
    """The one way a stage runs in its folder: the folder made, the resolved config saved (`config.yaml`) at
    the start, a clock started, and `finish` writing `manifest.json` last, the file that says the folder's
    outputs are complete (see `outputs.py`). `main=False` (a training rank other than the main one) writes
    nothing."""

    def __init__(self, stage: str, config: BaseModel, out_dir: str | Path, *, main: bool = True):
        from .config import save_config

        self.stage, self.config, self.main = stage, config, main
        self.out = Path(out_dir)
        self.started = time.perf_counter()
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.out)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def finish(self, outputs: list[str | Path], counts: dict[str, Any], inputs: list[str | Path] | None = None,
               extra: dict[str, Any] | None = None, seconds: float | None = None) -> Path | None:
        """Write the manifest (main process only): the last file of the run. `seconds`: what the stage timed
        itself (a generator times its generation), else the time since the run began."""
        if not self.main:
            return None
        return write_manifest(self.out, self.stage, self.config, inputs=inputs, outputs=outputs, counts=counts,
                              seconds=self.seconds if seconds is None else seconds, extra=extra)
