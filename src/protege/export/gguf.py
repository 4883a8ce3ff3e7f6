"""HF folder -> GGUF files, with llama.cpp's own converter and quantizer.

Why llama.cpp's `convert_hf_to_gguf.py` and not a writer of our own on the `gguf` package: the
converter is where llama.cpp keeps, per architecture, every detail its runtime depends on (Gemma-3's
+1 norm shift and out-of-vocabulary row trim, LLaMA's q/k permutation for its RoPE layout, Qwen2's
biases, the tokenizer's pre-tokenizer id found by hashing a probe string, special-token ids). A
converter of our own would re-derive each of those and drift as llama.cpp changes; the upstream one
is versioned together with the runtime that reads its files. It is not in the llama-cpp-python
wheel, so the first export fetches the source distribution of the *installed* llama-cpp-python
version from PyPI (~77 MB, once) and keeps `convert_hf_to_gguf.py`, `conversion/` and `gguf-py/`
under PROTEGE_HOME. `PROTEGE_LLAMA_CPP` may point at a llama.cpp checkout instead (offline use).

The converter runs in a subprocess: it imports its own `gguf` (from `gguf-py/`), which must not
replace the `gguf` package transformers uses in this process. Quantized types other than the
converter's (Q4_0, Q4_K_M, ...) are made from the F32 file by llama.cpp's quantizer, through the
binding in llama-cpp-python.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..engine.gguf import require_llama_cpp
from ..errors import StageError
from ..files import atomic_dir, atomic_path

__all__ = ["GGUF_TYPES", "converter_dir", "convert", "quantize"]

# Output types: (written by the converter, or quantized from the F32 file by llama.cpp).
GGUF_TYPES = {"f32": "convert", "f16": "convert", "bf16": "convert", "q8_0": "quantize", "q4_0": "quantize",
              "q4_1": "quantize", "q4_k_m": "quantize", "q5_k_m": "quantize", "q6_k": "quantize"}
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")

# sha256 of the llama-cpp-python source distributions protege has fetched and checked: the converter is code
# that runs on the user's machine, so a known version is downloaded with `pip --require-hashes` (a changed
# file on the index is refused). Another version is fetched with pip's usual index checks and a warning.
_SDIST_SHA256 = {
    "0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
}

# Runs inside the converter's subprocess. A tokenizer whose pre-tokenizer hash llama.cpp does not
# know is refused by the converter; when it is plain GPT-2 byte-level BPE (the regex llama.cpp calls
# "gpt-2") or GPT-4's split + byte-level (protege's own tokenizer; llama.cpp's "llama-bpe"), that is what
# we declare, and the round-trip checks then prove the tokens agree.
_DRIVER = r"""
import json, sys
GPT4_SPLIT = @GPT4_SPLIT@
sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[1] + "/gguf-py")
import conversion.base as base

_orig = base.TextModel.get_vocab_base_pre

def _pre(self, tokenizer):
    try:
        return _orig(self, tokenizer)
    except NotImplementedError:
        tj = json.loads((self.dir_model / "tokenizer.json").read_text(encoding="utf-8"))
        pre = tj.get("pre_tokenizer") or {}
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
            return "gpt-2"
        # GPT-4's split then byte-level (protege's own `train tokenizer`, Llama-3): llama.cpp's "llama-bpe".
        steps = pre.get("pretokenizers") or []
        if (pre.get("type") == "Sequence" and len(steps) == 2 and steps[0].get("type") == "Split"
                and steps[0].get("pattern", {}).get("Regex") == GPT4_SPLIT and steps[1].get("type") == "ByteLevel"
                and not steps[1].get("use_regex", True)):
            return "llama-bpe"
        raise

base.TextModel.get_vocab_base_pre = _pre

# Gemma-3: llama.cpp assumes every 6th layer is global unless the file lists the layers; the converter
# does not list them, so a model with another layer pattern would load with the wrong attention.
import conversion.gemma as gemma

_orig_params = gemma.Gemma3Model.set_gguf_parameters

def _params(self):
    _orig_params(self)
    types = self.hparams.get("layer_types")
    if types and self.hparams.get("sliding_window"):
        self.gguf_writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])

gemma.Gemma3Model.set_gguf_parameters = _params
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def _home() -> Path:
    from ..models import protege_home

    return protege_home() / "llama.cpp"


def converter_dir() -> Path:
    """A folder holding llama.cpp's `convert_hf_to_gguf.py`, `conversion/` and `gguf-py/`."""
    env = os.environ.get("PROTEGE_LLAMA_CPP")
    if env:
        if not (Path(env) / "convert_hf_to_gguf.py").is_file():
            raise StageError(f"PROTEGE_LLAMA_CPP={env}: no convert_hf_to_gguf.py there (point it at a llama.cpp checkout)")
        return Path(env)
    version = require_llama_cpp().__version__
    target = _home() / version
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    print(f"[export] fetching llama.cpp's converter: the llama-cpp-python {version} source distribution "
          "from PyPI (~77 MB, once)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp]
        pinned = _SDIST_SHA256.get(version)
        if pinned:
            req = Path(tmp) / "requirements.txt"
            req.write_text(f"llama-cpp-python=={version} --hash=sha256:{pinned}\n")
            cmd += ["--require-hashes", "-r", str(req)]
        else:
            print(f"[export] warning: llama-cpp-python {version} has no sha256 pinned in protege (pinned: "
                  f"{', '.join(_SDIST_SHA256)}); relying on the index's own hash", file=sys.stderr, flush=True)
            cmd.append(f"llama-cpp-python=={version}")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not archives:
            why = ("its sha256 does not match the one protege pinned" if "THESE PACKAGES DO NOT MATCH THE HASHES"
                   in proc.stderr else proc.stderr[-500:])
            raise StageError(f"could not fetch llama.cpp's converter ({' '.join(cmd)}): {why}; "
                             "offline, set PROTEGE_LLAMA_CPP to a llama.cpp checkout")
        with atomic_dir(target) as partial, tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                parts = member.name.split("/vendor/llama.cpp/", 1)
                if len(parts) != 2 or not parts[1].startswith(_MEMBERS) or not (member.isfile() or member.isdir()):
                    continue
                rel = Path(parts[1])
                if rel.is_absolute() or ".." in rel.parts:
                    continue
                dest = partial / rel
                if member.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, dest.open("wb") as out:  # type: ignore[union-attr]
                    shutil.copyfileobj(src, out)
            if not (partial / "convert_hf_to_gguf.py").is_file():
                raise StageError(f"{archives[0].name} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
    return target


def convert(hf_dir: Path, out: Path, outtype: str) -> Path:
    """Run llama.cpp's converter on an HF folder; `outtype` f32, f16, bf16 or q8_0."""
    conv = converter_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, ".partial") as tmp:
        from ..train.tokenizer import GPT4_SPLIT

        driver = _DRIVER.replace("@GPT4_SPLIT@", repr(GPT4_SPLIT))
        cmd = [sys.executable, "-c", driver, str(conv), str(hf_dir), "--outfile", str(tmp), "--outtype", outtype]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not tmp.is_file():
            tail = "\n".join(line for line in proc.stderr.splitlines()[-15:])
            if "is not supported" in proc.stderr or "NotImplementedError" in proc.stderr:
                raise StageError(f"llama.cpp's converter cannot convert {hf_dir}: {tail}")
            raise StageError(f"llama.cpp's converter failed on {hf_dir} (exit {proc.returncode}):\n{tail}")
    return out


def quantize(src: Path, out: Path, qtype: str, threads: int | None = None) -> Path:
    """llama.cpp's quantizer (`llama_model_quantize`): `src` (F32/F16 GGUF) -> `qtype`."""
    llama_cpp = require_llama_cpp()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
    if ftype is None:
        raise StageError(f"llama.cpp {llama_cpp.__version__} has no quantization type {qtype}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or (os.cpu_count() or 1)
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # llama.cpp prints a line per tensor otherwise; errors still come through
    with atomic_path(out, ".partial") as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0 or not tmp.is_file():
            raise StageError(f"llama.cpp could not quantize {src} to {qtype} (return code {rc})")
    return out


def conversion_input(hf_dir: Path, work: Path, template: str, add_bos: bool) -> Path:
    """A view of `hf_dir` for the converter whose tokenizer config carries the GGUF's template and BOS rule.

    Files are symlinked; only the tokenizer config and template files are rewritten.
    """
    work.mkdir(parents=True, exist_ok=True)
    for p in hf_dir.iterdir():
        if p.name in ("tokenizer_config.json", "chat_template.jinja", "chat_template.json") or p.is_dir():
            continue
        (work / p.name).symlink_to(p.resolve())
    cfg_path = hf_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    cfg["chat_template"] = template
    cfg["add_bos_token"] = add_bos
    (work / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    (work / "chat_template.jinja").write_text(template, encoding="utf-8")
    return work
