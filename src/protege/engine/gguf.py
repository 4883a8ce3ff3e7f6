"""Reading and opening GGUF files (llama.cpp's format): what running a GGUF needs, apart from making one.

`export/` writes GGUF files and checks them; the llama.cpp engine only opens them. Both import from
here, so running a GGUF never needs the export stage.
"""

from __future__ import annotations

import struct
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



# GGUF value types (gguf-py's GGUFValueType): scalar struct formats, and the two variable-size ones.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_SKIPPED = object()  # what `value` returns for an array, which is not kept


class _Header:
    """A cursor over a GGUF header. gguf-py's `GGUFReader` builds a numpy view for every element of every
    array, which for a 262k-token vocabulary takes 8-13 s per file (gemma-3-270m: 7.9 s for q4_k_m, 13.2 s
    for f16); protege needs only the scalar and string values and a check that every tensor lies inside the
    file, which this does in well under a second, reading the header and skipping the arrays it does not keep."""

    def __init__(self, fh: Any, size: int):
        self.fh, self.size = fh, size

    def take(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        raw = self.fh.read(n)
        if len(raw) != n:
            raise ValueError("the file ends inside its header")
        return struct.unpack(fmt, raw)[0]

    def string(self) -> str:
        n = self.take("<Q")
        if n > self.size:
            raise ValueError(f"a string of {n} bytes in a {self.size}-byte file")
        raw = self.fh.read(n)
        if len(raw) != n:
            raise ValueError("the file ends inside its header")
        return raw.decode("utf-8")

    def value(self, kind: int) -> Any:
        if kind in _SCALAR:
            return self.take(_SCALAR[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise ValueError(f"unknown value type {kind}")
        item, count = self.take("<I"), self.take("<Q")
        if item in _SCALAR:  # skipped whole: a fixed size per item
            nbytes = count * struct.calcsize(_SCALAR[item])
            if self.fh.tell() + nbytes > self.size:
                raise ValueError("an array runs past the end of the file")
            self.fh.seek(nbytes, 1)
        else:
            for _ in range(count):
                self.value(item)
        return _SKIPPED


def read_metadata(path: Path) -> dict[str, Any]:
    """The scalar and string key/values of a GGUF header (arrays left out). A file that is not GGUF v2/v3, whose
    header is cut or malformed, or whose tensors reach past its end is a StageError naming it."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    out: dict[str, Any] = {}
    try:
        size = Path(path).stat().st_size
        with open(path, "rb") as fh:
            h = _Header(fh, size)
            if fh.read(4) != b"GGUF":
                raise ValueError("no GGUF magic at the start")
            version = h.take("<I")
            if version not in (2, 3) and int.from_bytes(version.to_bytes(4, "little"), "big") in (2, 3):
                raise ValueError("a big-endian GGUF (llama.cpp on this machine reads little-endian files; "
                                 "convert it again without --bigendian)")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} (llama.cpp reads 2 and 3)")
            n_tensors, n_kv = h.take("<Q"), h.take("<Q")
            for _ in range(n_kv):
                key = h.string()
                value = h.value(h.take("<I"))
                if value is not _SKIPPED:
                    out[key] = value
            names: set[str] = set()
            end = 0
            for _ in range(n_tensors):
                name = h.string()
                if name in names:
                    raise ValueError(f"tensor {name} is listed twice")
                names.add(name)
                dims = [h.take("<Q") for _ in range(h.take("<I"))]
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(h.take("<I"))]
                elements = 1
                for d in dims:
                    elements *= d
                end = max(end, h.take("<Q") + elements * type_size // block)
            align = int(out.get("general.alignment", 32))
            start = -(-fh.tell() // align) * align
            if start + end > size:
                raise ValueError(f"its tensors need {start + end} bytes and the file has {size} (cut short?)")
    except (ValueError, KeyError, UnicodeDecodeError, OverflowError, struct.error) as err:
        raise StageError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None
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
