"""The layer order of docs/architecture.md holds: no upward import, no cycle between files or packages.

Every `import` counts, those inside functions and under TYPE_CHECKING too, and so do the
`module:Config:run` strings of the stage registry (they are imports the runner performs).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOC = ROOT / "docs" / "architecture.md"
STAGE_TARGET = re.compile(r"[\"'](protege(?:\.\w+)+):\w+:\w+[\"']")


def modules(src: Path, top: str) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    out = {}
    for path in sorted((src / top).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _nearest(name: str, mods: dict) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(src: Path, top: str = "protege") -> dict[str, set[str]]:
    """module -> the project modules it imports (`from pkg import mod` resolves to the submodule)."""
    mods = modules(src, top)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, (path, is_pkg) in mods.items():
        text = path.read_text(encoding="utf-8")
        targets: list[str] = [m for m in STAGE_TARGET.findall(text)]
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".")[: len(mod.split(".")) - (0 if is_pkg else 1)]
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets += [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix for a in node.names]
        for t in targets:
            hit = _nearest(t, mods) if t.split(".")[0] == top else None
            if hit and hit != mod:
                graph[mod].add(hit)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def package_of(mod: str) -> str:
    """The unit a floor places: the first name under the top package (`protege.train.fit` -> `train`)."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for a, targets in graph.items():
        out.setdefault(package_of(a), set())
        for b in targets:
            if package_of(a) != package_of(b):
                out[package_of(a)].add(package_of(b))
    return out


def read_floors(doc: Path) -> dict[str, int]:
    """The ```layers block: one line per floor, `N name name ...`."""
    block = re.search(r"```layers\n(.*?)```", doc.read_text(encoding="utf-8"), re.S)
    assert block, f"{doc}: no ```layers block"
    floors: dict[str, int] = {"": 0}  # the top package's __init__ imports nothing of its own
    for line in block.group(1).splitlines():
        level, *names = line.split()
        for name in names:
            assert name not in floors, f"{doc}: {name} is placed twice"
            floors[name] = int(level)
    return floors


def violations(graph: dict[str, set[str]], floors: dict[str, int]) -> list[str]:
    """Every problem, one line each: an unplaced module, an upward import, a cycle."""
    problems = []
    for mod in sorted(graph):
        if package_of(mod) not in floors:
            problems.append(f"{mod}: its package {package_of(mod)!r} has no floor in the ```layers table")
    for a in sorted(graph):
        for b in sorted(graph[a]):
            fa, fb = floors.get(package_of(a)), floors.get(package_of(b))
            if fa is not None and fb is not None and fb > fa:
                problems.append(f"{a} (floor {fa}) imports {b} (floor {fb}): upward")
    problems += [f"file cycle: {' -> '.join(c)}" for c in cycles(graph)]
    problems += [f"package cycle: {' -> '.join(c)}" for c in cycles(package_graph(graph))]
    return problems


def test_protege_keeps_its_layers():
    problems = violations(import_graph(SRC), read_floors(DOC))
    assert not problems, "\n".join(problems)


def test_every_floor_name_exists():
    names = {package_of(m) for m in modules(SRC, "protege")}
    missing = sorted(set(read_floors(DOC)) - names)
    assert not missing, f"the ```layers table places modules that do not exist: {missing}"


@pytest.fixture()
def planted(tmp_path: Path) -> Path:
    """A small package with an upward import (low -> high, inside a function) and a file cycle."""
    pkg = tmp_path / "toy"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("from .a import x\n")
    (pkg / "low" / "a.py").write_text("x = 1\n\ndef f():\n    from ..high import y\n    return y\n")
    (pkg / "high.py").write_text("from .low import x\ny = x\n")
    (pkg / "c.py").write_text("from . import d\n")
    (pkg / "d.py").write_text("import toy.c\n")
    return tmp_path


def test_the_checker_catches_a_planted_upward_import_and_cycle(planted):
    graph = import_graph(planted, "toy")
    assert graph["toy.low.a"] == {"toy.high"}
    problems = violations(graph, {"": 0, "low": 0, "high": 1, "c": 1, "d": 1})
    assert "toy.low.a (floor 0) imports toy.high (floor 1): upward" in problems
    assert "file cycle: toy.c -> toy.d" in problems
    assert "package cycle: high -> low" in problems
    unplaced = violations(graph, {"": 0, "low": 0, "high": 1, "d": 1})
    assert "toy.c: its package 'c' has no floor in the ```layers table" in unplaced


# Files that docstrings may name although protege does not ship them: other projects' code.
EXTERNAL_FILES = {"convert_hf_to_gguf.py",  # llama.cpp's converter, fetched with llama-cpp-python's sources
                  "rlhf/loss/dpo.py"}  # torchtune's DPO loss, named as the model for protege's
_DOC_MD = re.compile(r"\b([A-Z][A-Z_]+\.md)\b")
_DOC_PY = re.compile(r"\b((?:[a-z_.]+/)*[a-z_]+\.py)\b")


def test_every_file_a_docstring_names_exists():
    """Comments and docstrings name README.md / BENCHMARKS.md / a module; never a file a user does not have."""
    src = SRC / "protege"
    shipped = {p.relative_to(src).as_posix() for p in src.rglob("*.py")}
    problems = []
    for path in sorted(src.rglob("*.py")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{n}"
            problems += [f"{where}: {m}" for m in _DOC_MD.findall(line) if not (ROOT / m).is_file()]
            for m in _DOC_PY.findall(line):
                ok = (any(m.endswith(e) for e in EXTERNAL_FILES) or any(s == m or s.endswith("/" + m) for s in shipped)
                      or (ROOT / m).is_file() or (ROOT / "benchmarks" / m).is_file() or m.startswith("."))
                if not ok:
                    problems.append(f"{where}: {m}")
    assert not problems, "files named in src/ that do not exist:\n" + "\n".join(problems)


def test_no_module_is_over_400_lines():
    """A module past 400 lines holds more than one idea: split it along its seam (docs/architecture.md)."""
    sizes = {p.relative_to(SRC).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
             for p in (SRC / "protege").rglob("*.py")}
    assert not {k: n for k, n in sizes.items() if n > 400}
