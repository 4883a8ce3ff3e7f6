"""Loading (model, tokenizer) from an alias, an HF folder or hub id, or a `.gguf` file; bitsandbytes options."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .pull import log, pull
from .registry import ALIASES, ModelError, alias_dir, is_pulled

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["resolve", "load_tokenizer", "quantization_kwargs", "load"]


def resolve(spec: str | os.PathLike) -> str:
    """Alias -> pulled HF folder; folders, .gguf files and hub ids pass through."""
    spec = str(spec)
    if spec.startswith("hf:"):  # explicit hub id, as data sources spell it
        return spec[3:]
    if spec in ALIASES:
        if not is_pulled(spec):
            log(f"model {spec} is not pulled yet; pulling it now")
        hf = pull(spec)
        return str(hf if ALIASES[spec].convert else alias_dir(spec) / ALIASES[spec].gguf_name)
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


ALLOW_PICKLE_ENV = "PROTEGE_ALLOW_PICKLE"


def _safetensors_only(folder: Path) -> bool | None:
    """True (weights must be safetensors) unless the user set PROTEGE_ALLOW_PICKLE=1; a local folder holding only
    pickled weights (`*.bin`, `*.pt`) gets a ModelError saying so, instead of transformers' generic miss."""
    if os.environ.get(ALLOW_PICKLE_ENV) == "1":
        return None
    if folder.is_dir() and not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")) | any(folder.glob("*.pt")):
        raise ModelError(f"{folder}: its weights are pickled (*.bin / *.pt), which can run code when loaded; protege "
                         f"loads safetensors only. Convert them, or trust this folder: {ALLOW_PICKLE_ENV}=1 protege ...")
    return True


def load(spec: str | os.PathLike, dtype: str = "float32", device: str | None = None,
         quantization: str = "none") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
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
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, use_safetensors=_safetensors_only(p),
                                                         **quant)
    except OSError as err:
        where = "" if p.exists() else f" (there is no local folder {path}, so it was looked up on the hub)"
        raise ModelError(f"cannot load model {spec!r}{where}: {err}") from None
    tok = load_tokenizer(path)
    if not quant:  # a quantized model is already on its device (and refuses .to)
        model.to(device)
    model.eval()
    return model, tok
