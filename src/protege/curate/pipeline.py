"""`run(CurateConfig)`: read inputs, apply the steps in order, write records, removals, card, manifest.

Invariant (checked at the end): records read + records created (split pieces, tag pairs,
mix repeats) == records written + entries in removed.jsonl. Every input record is either
in records.jsonl or listed in removed.jsonl under the id it came with.

Resume: after each step the kept records and all removals so far go to
`out_dir/.steps/NN-kind/` with a fingerprint of the inputs and the steps up to there; a
rerun after a kill continues from the last finished step. The folder is deleted when the
run completes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..config import save_config
from ..errors import StageError
from ..files import atomic_write_json, json_lines, read_jsonl
from ..formats import convert_obj, iter_source
from ..manifest import write_manifest
from ..outputs import publish, refuse_clobber
from ..records import Comparison, Conversation, Record, RecordError, check_messages, write_records
from . import clean, decontam, dedup, langid, mix, quality, split, tag
from .common import StepResult, messages_of, progress, removal, words
from .config import STEP_KINDS, CurateConfig

__all__ = ["run", "Context", "read_inputs"]

APPLY: dict[str, Callable[..., StepResult]] = {
    "clean": clean.apply, "split": split.apply, "dedup": dedup.apply, "language": langid.apply,
    "quality": quality.apply, "decontaminate": decontam.apply, "mix": mix.apply, "tag": tag.apply,
}
assert set(APPLY) == set(STEP_KINDS), "every step kind of curate/config.py needs its apply function here"
LENGTH_BINS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 1 << 30]


@dataclass
class Context:
    """What steps may need beyond their options: the run seed and cached tokenizers."""

    seed: int = 0
    tokenizers: dict[str, Any] = field(default_factory=dict)
    unchecked: dict[int, str] = field(default_factory=dict)  # id(record) -> why it failed validation on read

    def tokenizer(self, spec: str) -> Any:
        if spec not in self.tokenizers:
            from ..models import load_tokenizer

            self.tokenizers[spec] = load_tokenizer(spec)
        return self.tokenizers[spec]


def _log(msg: str) -> None:
    print(f"[curate] {msg}", file=sys.stderr, flush=True)


def _json_objects(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line, object, error) for each non-blank line of JSONL or item of a JSON list."""
    for lineno, obj in json_lines(path, keep_going=True, json_array=True):
        if isinstance(obj, RecordError):
            yield lineno, None, obj.problem
        else:
            yield lineno, obj, None


def _loose_conversation(obj: Any, source: str) -> Conversation | None:
    """A conversation whose turns clean can repair (empty turns, odd role order), or None."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("messages"), list):
        msgs = [{"role": m.get("role"), "content": m.get("content")} for m in obj["messages"] if isinstance(m, dict)]
    elif isinstance(obj.get("conversations"), list):
        msgs = [{"role": m.get("from"), "content": m.get("value")} for m in obj["conversations"] if isinstance(m, dict)]
    elif "instruction" in obj:
        user = "\n\n".join(str(obj.get(k) or "") for k in ("instruction", "input") if str(obj.get(k) or "").strip())
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": obj.get("output")}]
    else:
        return None
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    return Conversation(msgs, id=str(obj.get("id") or ""), source=str(obj.get("source") or source), meta=meta)


def unique_ids(records: list[Record], origins: list[str]) -> int:
    """Rename repeated ids in place (`x`, `x~dup2`, ...) so removed.jsonl and provenance name one record.

    Two inputs often reuse ids (two generation runs both start at `selfinstruct-0000`); refusing them
    would block an ordinary mix, and keeping them would make every later reference ambiguous. The new
    id keeps the old one in `meta.id_renamed_from`; each rename is logged with both locations.
    Returns the number renamed.
    """
    first: dict[str, str] = {}
    taken = {r.id for r in records}
    renamed = 0
    for rec, where in zip(records, origins):
        if rec.id not in first:
            first[rec.id] = where
            continue
        k = 2
        while f"{rec.id}~dup{k}" in taken:
            k += 1
        new = f"{rec.id}~dup{k}"
        if renamed < 5:
            _log(f"{where}: id {rec.id!r} already used at {first[rec.id]}; renamed to {new!r}")
        rec.meta = {**rec.meta, "id_renamed_from": rec.id}
        rec.id = new
        taken.add(new)
        first[new] = where
        renamed += 1
    if renamed > 5:
        _log(f"... {renamed} repeated ids renamed in all (meta.id_renamed_from keeps the original)")
    return renamed


def read_inputs(cfg: CurateConfig, ctx: Context) -> tuple[list[Record], list[dict[str, Any]], int]:
    """All input records in order (ids made unique), removal entries for unreadable ones (with
    skip_invalid), and how many ids were renamed."""
    repairable = bool(cfg.steps) and cfg.steps[0].step == "clean"
    records: list[Record] = []
    origins: list[str] = []
    removed: list[dict[str, Any]] = []
    for src in cfg.inputs:
        path = Path(src)
        if not path.exists():
            raise FileNotFoundError(f"{path}: input not found")
        if path.is_dir() and not (path / "dataset_info.json").exists():
            raise StageError(f"{path}: is a folder; curate reads record files (.jsonl, .json, .parquet, ...) "
                             "or a saved `datasets` folder")
        if path.suffix not in (".jsonl", ".json"):
            rows = list(iter_source(path, cfg.format))   # datasets-readable files: validated rows
            records.extend(rows)
            origins.extend(f"{path} row {i}" for i in range(1, len(rows) + 1))
            continue
        for lineno, obj, problem in progress(_json_objects(path), f"read {path.name}"):
            rec = None
            if problem is None:
                try:
                    rec = convert_obj(obj, cfg.format, path.stem)
                except RecordError as err:
                    problem = err.problem
                    rec = _loose_conversation(obj, path.stem) if repairable else None
                    if rec is not None:
                        ctx.unchecked[id(rec)] = problem
            if rec is not None:
                records.append(rec)
                origins.append(f"{path}:{lineno}")
                continue
            if not cfg.skip_invalid:
                raise RecordError(f"{problem} (set skip_invalid: true to list such lines in removed.jsonl)", str(path), lineno)
            rid = str(obj.get("id")) if isinstance(obj, dict) and obj.get("id") else f"{path.name}:{lineno}"
            removed.append({**removal(None, "invalid", f"{path}:{lineno}: {problem}", rid=rid, source=path.stem),
                            "step": "read"})
    return records, removed, unique_ids(records, origins)


def _validate(records: list[Record], ctx: Context) -> tuple[list[Record], list[dict[str, Any]]]:
    """Records read loosely must be valid once cleaning is over."""
    kept, removed = [], []
    for rec in records:
        if id(rec) in ctx.unchecked:
            try:
                rec.messages = check_messages(rec.messages)
            except RecordError as err:
                removed.append({**removal(rec, "invalid", err.problem), "step": "validate"})
                continue
        kept.append(rec)
    ctx.unchecked.clear()
    return kept, removed


def _validate_step(records: list[Record], removed: list[dict[str, Any]], summaries: list[dict[str, Any]],
                   ctx: Context) -> tuple[list[Record], list[dict[str, Any]]]:
    kept, bad = _validate(records, ctx)
    if bad:
        summaries.append({"step": "validate", "in": len(records), "out": len(kept), "removed": len(bad), "added": 0,
                          "reasons": {"invalid": len(bad)}, "seconds": 0.0, "stats": {}})
    return kept, removed + bad


def length_histogram(records: list[Record]) -> dict[str, list[int]]:
    """Messages per word-count bin (LENGTH_BINS), per role."""
    import numpy as np

    lengths: dict[str, list[int]] = {}
    for rec in records:
        for m in messages_of(rec):
            lengths.setdefault(m["role"], []).append(len(words(m["content"])) if isinstance(m["content"], str) else 0)
    return {role: np.histogram(v, bins=LENGTH_BINS)[0].tolist() for role, v in sorted(lengths.items())}


def _fingerprint(cfg: CurateConfig, upto: int) -> str:
    files = [(p, Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in cfg.inputs if Path(p).exists()]
    blob = json.dumps({"files": files, "format": cfg.format, "skip_invalid": cfg.skip_invalid, "seed": cfg.seed,
                       "steps": [s.model_dump(mode="json") for s in cfg.steps[:upto + 1]]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _from_dict(obj: dict[str, Any]) -> Record:
    if "chosen" in obj:
        return Comparison(obj["prompt"], obj["chosen"], obj["rejected"], obj.get("margin"), obj["id"], obj["source"], obj["meta"])
    return Conversation(obj["messages"], obj["id"], obj["source"], obj["meta"])


def _save_step(ckpt: Path, fp: str, records: list[Record], removed: list[dict[str, Any]], state: dict[str, Any]) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    write_records(ckpt / "kept.jsonl", records)
    write_records(ckpt / "removed.jsonl", removed)
    atomic_write_json(ckpt / "state.json", {"fingerprint": fp, **state}, indent=None)  # last: marks the step finished


def _load_step(ckpt: Path, fp: str) -> tuple[list[Record], list[dict[str, Any]], dict[str, Any]] | None:
    try:
        state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if state.get("fingerprint") != fp:
        return None

    kept, removed = (read_jsonl(ckpt / name, allow_nan=True) for name in ("kept.jsonl", "removed.jsonl"))
    return [_from_dict(o) for o in kept], removed, state


def run(config: CurateConfig) -> dict[str, Any]:
    """Run the curation steps; write records.jsonl, removed.jsonl, card.md/html, config.yaml, manifest.json."""
    from .card import write_card

    cfg = config
    if not cfg.inputs:
        raise StageError("curate: no inputs (give record files: `protege curate IN... --out DIR`)")
    t_start = time.perf_counter()
    out = Path(cfg.out_dir)
    refuse_clobber(cfg.inputs, [out], "curate")
    work = out / ".steps"
    ctx = Context(seed=cfg.seed)
    resumed = None
    for i in reversed(range(len(cfg.steps))):
        resumed = _load_step(work / f"{i:02d}-{cfg.steps[i].step}", _fingerprint(cfg, i))
        if resumed is not None:
            records, removed, state = resumed
            start, summaries, inputs = i + 1, state["steps"], state["inputs"]
            renamed = inputs.get("renamed_ids", 0)
            _log(f"resuming after step {i + 1} ({cfg.steps[i].step}) from {work}")
            break
    if resumed is None:
        records, removed, renamed = read_inputs(cfg, ctx)
        inputs = {"records": len(records) + len(removed), "per_source": dict(Counter(r.source for r in records)),
                  "unreadable": len(removed), "lengths": length_histogram(records), "renamed_ids": renamed}
        for entry in removed:
            inputs["per_source"][entry["source"]] = inputs["per_source"].get(entry["source"], 0) + 1
        start, summaries = 0, []
        _log(f"read {inputs['records']} records from {len(cfg.inputs)} file(s)")
    for i in range(start, len(cfg.steps)):
        opts = cfg.steps[i]
        if opts.step != "clean" and ctx.unchecked:
            records, removed = _validate_step(records, removed, summaries, ctx)
        t0, n_in = time.perf_counter(), len(records)
        result = APPLY[opts.step](records, opts, ctx)
        for entry in result.removed:
            entry["step"] = opts.step
        records, removed = result.kept, removed + result.removed
        summaries.append({"step": opts.step, "in": n_in, "out": len(records), "removed": len(result.removed),
                          "added": result.added, "reasons": dict(Counter(e["reason"] for e in result.removed)),
                          "seconds": round(time.perf_counter() - t0, 3), "stats": result.stats})
        _log(f"step {i + 1}/{len(cfg.steps)} {opts.step}: {n_in} in, {len(records)} out, "
             f"{len(result.removed)} removed ({summaries[-1]['seconds']:.1f} s)")
        if i < len(cfg.steps) - 1:
            _save_step(work / f"{i:02d}-{opts.step}", _fingerprint(cfg, i), records, removed,
                       {"steps": summaries, "inputs": inputs})
    if ctx.unchecked:
        records, removed = _validate_step(records, removed, summaries, ctx)
    added = sum(s["added"] for s in summaries)
    if inputs["records"] + added != len(records) + len(removed):
        raise RuntimeError(f"curate bug: {inputs['records']} in + {added} created != {len(records)} out + {len(removed)} removed")
    if len({r.id for r in records}) != len(records):
        raise RuntimeError("curate bug: ids in records.jsonl are not unique")

    out.mkdir(parents=True, exist_ok=True)
    with publish(out) as staged:  # all or nothing: a failure here leaves the previous outputs intact
        write_records(staged / "records.jsonl", records)
        write_records(staged / "removed.jsonl", removed)
        save_config(cfg, staged)
        per_source_out = dict(Counter(r.source for r in records))
        report = {"inputs": inputs, "input_paths": list(cfg.inputs), "steps": summaries,
                  "per_source_out": per_source_out,
                  "removed_by": dict(Counter(f"{e['step']}:{e['reason']}" for e in removed)),
                  "removed_per_source": dict(Counter(e["source"] for e in removed)),
                  "removed_examples": {f"{e['step']}:{e['reason']}": e["detail"] for e in reversed(removed)},
                  "lengths_out": length_histogram(records), "length_bins": LENGTH_BINS,
                  "renamed_ids": renamed}
        outputs = ["records.jsonl", "removed.jsonl"]
        if cfg.card:
            outputs += [Path(p).name for p in write_card(staged, report)]
        counts = {"in": inputs["records"], "out": len(records), "removed": len(removed), "added": added}
        if renamed:
            counts["renamed_ids"] = renamed
        markers = next((s["stats"]["markers"] for s in summaries if s["step"] == "tag"), None)
        extra: dict[str, Any] = {"steps": [{k: v for k, v in s.items() if k != "stats"} for s in summaries]}
        if markers:
            extra["markers"] = markers
        hits = [h for s in summaries for h in s["stats"].get("contamination_hits", [])]
        if any("eval_sets" in s["stats"] for s in summaries):
            extra["contamination"] = {"eval_sets": {k: v for s in summaries for k, v in s["stats"].get("eval_sets", {}).items()},
                                      "eval_items_hit": sorted({f"{h['eval_set']}:{h['eval_id']}" for h in hits})}
        write_manifest(staged, "curate", cfg, inputs=cfg.inputs, outputs=[out / name for name in outputs],
                       counts=counts, seconds=time.perf_counter() - t_start, extra=extra)
    shutil.rmtree(work, ignore_errors=True)
    return {**counts, "steps": [{"step": s["step"], "in": s["in"], "out": s["out"], "removed": s["removed"]} for s in summaries]}
