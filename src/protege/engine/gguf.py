"""Reading and opening GGUF files (llama.cpp's format): what running a GGUF needs, apart from making one.

`export/` writes GGUF files and checks them; the llama.cpp engine only opens them. Both import from
here, so running a GGUF never needs the export stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import StageError

__all__ = ["open_gguf", "read_metadata", "require_llama_cpp"]


def require_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise StageError("this needs llama.cpp's Python binding: pip install 'protege[llamacpp]' "
                         "(builds llama-cpp-python from source, a few minutes)") from None
    return llama_cpp



def read_metadata(path: Path) -> dict[str, Any]:
    """The scalar and string key/values of a GGUF header (arrays left out), via the `gguf` reader."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # noqa: BLE001 — any parse failure: the file is not a usable GGUF
        raise StageError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or len(field.types) != 1:
            continue
        try:
            value = field.contents()
        except Exception:  # noqa: BLE001
            continue
        out[key] = value
    return out


def open_gguf(path: Path, n_ctx: int = 2048, threads: int | None = None, logits_all: bool = False) -> Any:
    """A llama-cpp-python `Llama` on `path`, quiet; a corrupt or truncated file is a StageError."""
    llama_cpp = require_llama_cpp()
    read_metadata(path)  # a clear error for a file llama.cpp would crash on or refuse obscurely
    if threads is None:
        # llama-cpp-python's default is half the logical CPUs (1 thread on a 2-core machine: 0.59x of a
        # 2-thread run, measured); use what torch uses, i.e. the physical cores, like protege's engine.
        threads = torch.get_num_threads()
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                               logits_all=logits_all, verbose=False)
    except (ValueError, RuntimeError) as err:
        raise StageError(f"{path}: llama.cpp could not load it ({err})") from None
