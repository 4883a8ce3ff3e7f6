"""Reading a GGUF's header: protege's reader vs gguf-py's `GGUFReader`, on the same files, in one run.

    python benchmarks/gguf_header.py [FILE.gguf ...]      # default: every GGUF the built-in models pulled

protege reads a GGUF's metadata before llama.cpp opens it (`protege serve/chat FILE.gguf`, the judge,
`protege export`'s checks) to refuse a broken file with a clear message. gguf-py's reader builds a numpy
view for every vocabulary entry; protege's keeps scalars and strings and skips arrays. Both must return
the same values (checked here); the ratio is gguf-py's time over protege's, best of `--repeat` reads.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def _gguf_py(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.") and len(f.types) == 1}


def _best(fn, path: Path, repeat: int) -> tuple[float, dict]:
    times, value = [], {}
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = fn(path)
        times.append(time.perf_counter() - t0)
    return min(times), value


def main() -> None:
    from protege.engine.gguf import read_metadata
    from protege.models.registry import protege_home

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    files = args.files or sorted((protege_home() / "models").glob("*/*.gguf"))
    if not files:
        raise SystemExit("no GGUF files: run `protege pull gemma-3-270m smollm2-135m-instruct` or name some")
    for path in files:
        ours, a = _best(read_metadata, path, args.repeat)
        theirs, b = _best(_gguf_py, path, args.repeat)
        same = "same values" if a == b else f"DIFFERENT values: {sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))}"
        print(f"{path.name:48s} {path.stat().st_size / 2**20:8.1f} MiB  protege {ours:7.3f} s  gguf-py {theirs:7.3f} s  "
              f"ratio {theirs / ours:6.1f}x  ({same})")


if __name__ == "__main__":
    main()
