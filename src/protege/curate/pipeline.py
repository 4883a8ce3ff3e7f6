"""`run(CurateConfig)`: read inputs, apply the steps in order, write records, removals, card, manifest.

The records stream through files (`stream.py`): the inputs are read once into `out_dir/.steps/read/`, and
step i reads the previous folder's `kept.jsonl` chunk by chunk and writes its own `NN-kind/` folder (kept
records, its removal entries, and `state.json` last, with a fingerprint of the inputs and the steps up to
there). Per-record steps run on chunks in `workers` processes; dedup streams in two passes; `mix` and a
quality step with `top_k_by` rank the whole set and hold their input in memory.

Invariant (checked at the end): records read + records created (split pieces, tag pairs,
mix repeats) == records written + entries in removed.jsonl. Every input record is either
in records.jsonl or listed in removed.jsonl under the id it came with.

Resume: a rerun after a kill continues after the last step whose state.json matches; the folder is
deleted when the run completes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..errors import StageError
from ..files import atomic_write_json, json_digest, parse_jsonl_line
from ..manifest import StageRun
from ..outputs import publish, refuse_clobber
from ..records import Record, RecordError, check_messages
from . import clean, decontam, dedup, langid, mix, quality, score, split, tag
from .common import Context, StepResult, log, messages_of, progress, removal, words
from .config import STEP_KINDS, CurateConfig
from .read import UNCHECKED, IdRenamer, read_inputs
from . import stream
from .stream import RecordWriter, chunked, mapper, merge_stats, ray_connection, read_chunks, resolve_workers

__all__ = ["run", "Context", "LengthHistogram"]

APPLY: dict[str, Callable[..., StepResult]] = {
    "clean": clean.apply, "split": split.apply, "dedup": dedup.apply, "language": langid.apply,
    "quality": quality.apply, "decontaminate": decontam.apply, "mix": mix.apply, "tag": tag.apply,
    "score": score.apply,
}
assert set(APPLY) == set(STEP_KINDS), "every step kind of curate/config.py needs its apply function here"
LENGTH_BINS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 1 << 30]


class LengthHistogram:
    """Messages per word-count bin (LENGTH_BINS), per role, accumulated chunk by chunk."""

    def __init__(self) -> None:
        self.counts: dict[str, Any] = {}

    def add(self, records: Iterable[Record]) -> None:
        import numpy as np

        lengths: dict[str, list[int]] = {}
        for rec in records:
            for m in messages_of(rec):
                lengths.setdefault(m["role"], []).append(len(words(m["content"])) if isinstance(m["content"], str) else 0)
        for role, v in lengths.items():
            h = np.histogram(v, bins=LENGTH_BINS)[0]
            self.counts[role] = self.counts[role] + h if role in self.counts else h

    def result(self) -> dict[str, list[int]]:
        return {role: h.tolist() for role, h in sorted(self.counts.items())}


def _in_memory(opts: Any) -> bool:
    """Steps that rank or sample the whole set (the others judge each record alone)."""
    return opts.step == "mix" or (opts.step == "quality" and bool(opts.top_k_by) and opts.top_k is not None)


def _validate(records: list[Record]) -> tuple[list[Record], list[dict[str, Any]]]:
    """Records read loosely must be valid once cleaning is over."""
    kept, removed = [], []
    for rec in records:
        problem = rec.meta.pop(UNCHECKED, None)
        if problem is not None:
            try:
                rec.messages = check_messages(rec.messages)
            except RecordError as err:
                removed.append({**removal(rec, "invalid", err.problem), "step": "validate"})
                continue
        kept.append(rec)
    return kept, removed


_WORKER_CTX: dict[int, Context] = {}  # per process: tokenizers load once per worker, not once per chunk


def _apply_chunk(task: tuple[str, Any, int, list[Record]]) -> StepResult:
    """One step on one chunk (in a worker process, or in this one), its removals stamped with the step."""
    kind, opts, seed, chunk = task
    result = APPLY[kind](chunk, opts, _WORKER_CTX.setdefault(seed, Context(seed=seed)))
    _stamped(result.removed, kind)
    return result


def _finish_stats(kind: str, stats: dict[str, Any], first: dict[str, Any]) -> dict[str, Any]:
    """Stats summed over chunks, made whole again where a sum is not the answer."""
    if kind == "language" and "languages" in stats:
        stats["languages"] = dict(sorted(stats["languages"].items(), key=lambda kv: -kv[1]))
    if kind == "decontaminate" and "eval_sets" in first:  # every chunk saw the same eval sets
        hit = {(h["eval_set"], h["eval_id"]) for h in stats["contamination_hits"]}
        stats["eval_sets"] = {s: {"prompts": v["prompts"], "prompts_hit": sum(1 for e, _ in hit if e == s)}
                              for s, v in first["eval_sets"].items()}
    return stats


def _run_step(opts: Any, src: Path, folder: Path, cfg: CurateConfig, validate: bool,
              workers: int) -> tuple[list[dict[str, Any]], int, int]:
    """Step `opts` from `src` into `folder`; returns its summaries (and validation's), records out, removed."""
    t0 = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    n_in = n_bad = added = 0
    stats: dict[str, Any] = {}
    first: dict[str, Any] | None = None
    reasons: Counter = Counter()
    with RecordWriter(folder / "kept.jsonl") as kept_w, RecordWriter(folder / "removed.jsonl") as removed_w, \
            RecordWriter(folder / "validate.jsonl") as bad_w:
        def emit(kept: list[Record], removed: list[dict[str, Any]]) -> None:
            nonlocal n_bad
            kept, bad = _validate(kept) if validate else (kept, [])
            kept_w.write_all(kept)
            removed_w.write_all(removed)
            bad_w.write_all(bad)
            reasons.update(e["reason"] for e in removed)
            n_bad += len(bad)

        def counted() -> Iterable[list[Record]]:
            nonlocal n_in
            for chunk in progress(read_chunks(src), opts.step):
                n_in += len(chunk)
                yield chunk

        with mapper(workers, cfg.ray_address) as map_fn:
            if opts.step == "dedup":
                def twice() -> Iterable[list[Record]]:  # dedup reads its input twice; count it once
                    return counted() if n_in == 0 else read_chunks(src)

                stats = dedup.run(twice, opts, Context(seed=cfg.seed), lambda k, r: emit(k, _stamped(r, "dedup")),
                                  map_fn)
            elif _in_memory(opts):
                result = _apply_chunk((opts.step, opts, cfg.seed, [r for chunk in counted() for r in chunk]))
                emit(result.kept, result.removed)
                stats, added = result.stats, result.added
            else:
                tasks = ((opts.step, opts, cfg.seed, chunk) for chunk in counted())
                for result in map_fn(_apply_chunk, tasks):
                    emit(result.kept, result.removed)
                    first = result.stats if first is None else first
                    stats, added = merge_stats(stats, result.stats), added + result.added
    stats = _finish_stats(opts.step, stats, first or {})
    n_out = kept_w.written
    summaries = [{"step": opts.step, "in": n_in, "out": n_out + n_bad, "removed": removed_w.written, "added": added,
                  "reasons": dict(reasons), "seconds": round(time.perf_counter() - t0, 3), "stats": stats}]
    if n_bad:
        summaries.append({"step": "validate", "in": n_out + n_bad, "out": n_out, "removed": n_bad, "added": 0,
                          "reasons": {"invalid": n_bad}, "seconds": 0.0, "stats": {}})
    return summaries, n_out, removed_w.written + n_bad


def _stamped(removed: list[dict[str, Any]], step: str) -> list[dict[str, Any]]:
    for entry in removed:
        entry["step"] = step
    return removed


def _fingerprint(cfg: CurateConfig, upto: int) -> str:
    files = [(p, Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in cfg.inputs if Path(p).exists()]
    return json_digest({"files": files, "format": cfg.format, "skip_invalid": cfg.skip_invalid, "seed": cfg.seed,
                        "steps": [s.model_dump(mode="json") for s in cfg.steps[:upto + 1]]})


def _finished(folder: Path, fp: str) -> dict[str, Any] | None:
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return state if state.get("fingerprint") == fp else None


def _read(cfg: CurateConfig, folder: Path) -> dict[str, Any]:
    """The inputs, as one record file in `folder`; returns the input statistics for the card."""
    shutil.rmtree(folder, ignore_errors=True)
    ids, lengths = IdRenamer(), LengthHistogram()
    per_source: Counter = Counter()
    unreadable: Counter = Counter()  # by source; listed after the readable ones, as the card shows them
    with RecordWriter(folder / "kept.jsonl") as kept_w, RecordWriter(folder / "removed.jsonl") as removed_w:
        def readable() -> Iterator[Record]:
            for rec, entry in read_inputs(cfg, ids):
                if entry is None:
                    yield rec
                else:
                    removed_w.write_all([entry])
                    unreadable[entry["source"]] += 1

        for chunk in chunked(readable(), stream.CHUNK):
            kept_w.write_all(chunk)
            lengths.add(chunk)
            per_source.update(r.source for r in chunk)
    n_unreadable = sum(unreadable.values())
    return {"records": kept_w.written + n_unreadable, "per_source": dict(per_source + unreadable),
            "unreadable": n_unreadable, "lengths": lengths.result(), "renamed_ids": ids.renamed}


def _folders(cfg: CurateConfig, work: Path) -> list[Path]:
    return [work / "read", *(work / f"{i:02d}-{s.step}" for i, s in enumerate(cfg.steps))]


def run(config: CurateConfig) -> dict[str, Any]:
    """Run the curation steps; write records.jsonl, removed.jsonl, card.md/html, config.yaml, manifest.json."""
    cfg = config
    if not cfg.inputs:
        raise StageError("curate: no inputs (give record files: `protege curate IN... --out DIR`)")
    t_start = time.perf_counter()
    out = Path(cfg.out_dir)
    refuse_clobber(cfg.inputs, [out], "curate")
    work = out / ".steps"
    folders = _folders(cfg, work)
    workers = resolve_workers(cfg.workers)
    # The last folder (read = 0, step i = i + 1) whose state matches: everything up to it is done.
    done = next((k for k in reversed(range(len(folders))) if _finished(folders[k], _fingerprint(cfg, k - 1))), None)
    if done is None:
        inputs = _read(cfg, folders[0])
        atomic_write_json(folders[0] / "state.json", {"fingerprint": _fingerprint(cfg, -1), "inputs": inputs,
                                                      "steps": [], "out": inputs["records"] - inputs["unreadable"]},
                          indent=None)
        done = 0
        log(f"read {inputs['records']} records from {len(cfg.inputs)} file(s)")
    state = json.loads((folders[done] / "state.json").read_text(encoding="utf-8"))
    inputs, summaries = state["inputs"], state["steps"]
    if done > 0:
        log(f"resuming after step {done} ({cfg.steps[done - 1].step}) from {work}")
    with ray_connection(cfg.ray_address if done < len(cfg.steps) else None):  # one connection for every step
        summaries = _run_steps(cfg, folders, done, inputs, summaries, workers)
    _publish(cfg, out, folders, inputs, summaries, t_start)
    shutil.rmtree(work, ignore_errors=True)
    counts = _counts(inputs, summaries)
    return {**counts, "steps": [{"step": s["step"], "in": s["in"], "out": s["out"], "removed": s["removed"]}
                                for s in summaries]}


def _run_steps(cfg: CurateConfig, folders: list[Path], done: int, inputs: dict[str, Any],
               summaries: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    """Steps after `done`, each from the folder before it; a step's state.json is written last (the resume point)."""
    leading_cleans = next((i for i, s in enumerate(cfg.steps) if s.step != "clean"), len(cfg.steps))
    for i in range(done, len(cfg.steps)):
        opts = cfg.steps[i]
        validate = i == leading_cleans - 1  # loosely read records are checked once cleaning is over
        step_summaries, n_out, n_removed = _run_step(opts, folders[i] / "kept.jsonl", folders[i + 1], cfg,
                                                     validate, workers)
        summaries = summaries + step_summaries
        s = step_summaries[0]
        where = (f", Ray at {cfg.ray_address}" if cfg.ray_address is not None
                 else f", {workers} workers" if workers > 1 else "")
        log(f"step {i + 1}/{len(cfg.steps)} {opts.step}: {s['in']} in, {n_out} out, {n_removed} removed "
            f"({s['seconds']:.1f} s{where})")
        atomic_write_json(folders[i + 1] / "state.json", {"fingerprint": _fingerprint(cfg, i), "inputs": inputs,
                                                          "steps": summaries, "out": n_out}, indent=None)
    return summaries


def _counts(inputs: dict[str, Any], summaries: list[dict[str, Any]]) -> dict[str, int]:
    added = sum(s["added"] for s in summaries)
    removed = inputs["unreadable"] + sum(s["removed"] for s in summaries)
    out = inputs["records"] - inputs["unreadable"] if not summaries else summaries[-1]["out"]
    counts = {"in": inputs["records"], "out": out, "removed": removed, "added": added}
    if inputs.get("renamed_ids"):
        counts["renamed_ids"] = inputs["renamed_ids"]
    return counts


def _publish(cfg: CurateConfig, out: Path, folders: list[Path], inputs: dict[str, Any],
             summaries: list[dict[str, Any]], t_start: float) -> None:
    """records.jsonl (the last folder's records) and removed.jsonl (every folder's removals, in order), the
    card and the manifest, all or nothing: a failure leaves the previous outputs intact."""
    from .card import write_card

    counts = _counts(inputs, summaries)
    last = next(f for f in reversed(folders) if (f / "state.json").exists())
    lengths, per_source_out, seen = LengthHistogram(), Counter(), set()
    for chunk in read_chunks(last / "kept.jsonl"):
        lengths.add(chunk)
        per_source_out.update(r.source for r in chunk)
        seen.update(r.id for r in chunk)
    if len(seen) != counts["out"]:
        raise RuntimeError(f"curate bug: {counts['out']} records written but {len(seen)} distinct ids")
    del seen
    if counts["in"] + counts["added"] != counts["out"] + counts["removed"]:
        raise RuntimeError(f"curate bug: {counts['in']} in + {counts['added']} created != {counts['out']} out + "
                           f"{counts['removed']} removed")
    removed_by, removed_per_source, examples = Counter(), Counter(), {}
    out.mkdir(parents=True, exist_ok=True)
    with publish(out) as staged:  # config, outputs and manifest appear together
        stage = StageRun("curate", cfg, staged)
        try:  # a hard link costs nothing; the step folder is deleted after publishing
            os.link(last / "kept.jsonl", staged / "records.jsonl")
        except OSError:
            shutil.copyfile(last / "kept.jsonl", staged / "records.jsonl")
        with (staged / "removed.jsonl").open("w", encoding="utf-8") as fh:
            for folder in folders:
                for name in ("removed.jsonl", "validate.jsonl"):
                    if not (folder / name).exists():
                        continue
                    with (folder / name).open(encoding="utf-8") as src:
                        for line in src:
                            e = parse_jsonl_line(line, allow_nan=True)
                            if e is None:
                                continue
                            removed_by[f"{e['step']}:{e['reason']}"] += 1
                            removed_per_source[e["source"]] += 1
                            examples.setdefault(f"{e['step']}:{e['reason']}", e["detail"])
                            fh.write(line)
        report = {"inputs": inputs, "input_paths": list(cfg.inputs), "steps": summaries,
                  "per_source_out": dict(per_source_out), "removed_by": dict(removed_by),
                  "removed_per_source": dict(removed_per_source), "removed_examples": examples,
                  "lengths_out": lengths.result(), "length_bins": LENGTH_BINS, "renamed_ids": inputs["renamed_ids"]}
        outputs = ["records.jsonl", "removed.jsonl"]
        if cfg.card:
            outputs += [Path(p).name for p in write_card(staged, report)]
        markers = next((s["stats"]["markers"] for s in summaries if s["step"] == "tag"), None)
        extra: dict[str, Any] = {"steps": [{k: v for k, v in s.items() if k != "stats"} for s in summaries]}
        if markers:
            extra["markers"] = markers
        hits = [h for s in summaries for h in s["stats"].get("contamination_hits", [])]
        if any("eval_sets" in s["stats"] for s in summaries):
            extra["contamination"] = {"eval_sets": {k: v for s in summaries for k, v in s["stats"].get("eval_sets", {}).items()},
                                      "eval_items_hit": sorted({f"{h['eval_set']}:{h['eval_id']}" for h in hits})}
        stage.finish([out / name for name in outputs], counts, inputs=cfg.inputs, extra=extra,
                     seconds=time.perf_counter() - t_start)  # the whole run, reading and every step included
