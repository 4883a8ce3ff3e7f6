"""`protege curate` at a million records: peak memory, records/s, and recall of planted faults.

    python benchmarks/curate_scale.py                # 1,000,000 conversations (about 6 minutes here)
    python benchmarks/curate_scale.py --n 100000     # a quicker look

Synthetic conversations (English words, so the language model and the dedup shingles see real text) with
three kinds of planted faults, each tagged in `meta.planted`:
- exact duplicates of an earlier conversation (5%), under a new id;
- near duplicates: an earlier conversation with one word appended to its answer (5%);
- non-English conversations: German, French or Spanish (5%).
`protege curate` runs in its own process (clean -> dedup -> language, the defaults of each step), once per
worker count, and the summed resident memory of its process tree is sampled. Then every input id must be in records.jsonl or removed.jsonl with a
reason, and each planted fault must be removed for its reason (recall) while clean records stay (precision).
Goal (issue 28): peak RSS <= 4 GB at 1M records; the same output for any number of workers.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

EN = ("the of and to in is was for on that with as by at from his her they this which are have an be one not but "
      "what all were when we there can more if will about up out many then them these so some would make like into "
      "time has look two write go see number way could people than first water been call who oil its now find long "
      "down day did get come made may part over new sound take only little work know place year live me back give "
      "most very after thing our just name good sentence man think say great where help through much before line "
      "right too mean old any same tell boy follow came want show also around form three small set put end does "
      "another well large must big even such because turn here why ask went men read need land different home us "
      "move try kind hand picture again change off play spell air away animal house point page letter mother answer "
      "found study still learn should world").split()
OTHER = {
    "de": ("der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als auch es an werden aus er "
           "hat dass sie nach wird bei einer um am sind noch wie einem über einen so zum war haben nur oder aber vor "
           "zur bis mehr durch man sein wurde sei").split(),
    "fr": ("le de un être et à il avoir ne je son que se qui ce dans en du elle au pour pas vous par sur faire plus "
           "dire me on mon lui nous comme mais pouvoir avec tout y aller voir bien où sans tu ou leur homme si deux "
           "mari moi vouloir te femme venir quand grand celui notre devoir là jour").split(),
    "es": ("el la de que y a en un ser se no haber por con su para como estar tener le lo todo pero más hacer o "
           "poder decir este ir otro ese si me ya ver porque dar cuando muy sin vez mucho saber qué sobre mi alguno "
           "mismo yo también hasta año dos querer entre así primero desde grande eso ni nos llegar pasar").split(),
}


def write_corpus(path: Path, n: int, seed: int = 0) -> Counter:
    """n conversations into `path`; returns how many of each planted kind."""
    rng = random.Random(seed)
    pool: list[dict] = []  # earlier clean conversations that duplicates copy
    planted: Counter = Counter()
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            r = rng.random()
            if pool and r < 0.05:
                kind, msgs = "exact", rng.choice(pool)["messages"]
            elif pool and r < 0.10:
                kind, msgs = "near", [dict(m) for m in rng.choice(pool)["messages"]]
                msgs[1]["content"] += " " + rng.choice(EN)
            elif r < 0.15:
                kind = rng.choice(sorted(OTHER))
                words = OTHER[kind]
                msgs = [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(12, 30)))},
                        {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(30, 90)))}]
            else:
                kind = "clean"
                msgs = [{"role": "user", "content": " ".join(rng.choices(EN, k=rng.randint(12, 30))) + "?"},
                        {"role": "assistant", "content": " ".join(rng.choices(EN, k=rng.randint(30, 120))) + "."}]
            rec = {"id": f"r{i:07d}", "messages": msgs, "meta": {"planted": kind}}
            if kind == "clean":
                if len(pool) < 5000:
                    pool.append(rec)
                elif rng.random() < 0.01:
                    pool[rng.randrange(len(pool))] = rec
            planted[kind] += 1
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return planted


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--work", default=None, help="folder for the corpus and outputs (default: a temporary one)")
    ap.add_argument("--workers", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2],
                    help="worker counts to compare (comma-separated)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="curate-scale-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus = work / "corpus.jsonl"
        t0 = time.perf_counter()
        planted = write_corpus(corpus, args.n)
        print(f"corpus: {args.n:,} conversations, {corpus.stat().st_size / 2**20:.0f} MiB, planted {dict(planted)} "
              f"({time.perf_counter() - t0:.0f} s to write)", flush=True)
        cfg = work / "curate.yaml"
        cfg.write_text("steps:\n  - step: clean\n  - step: dedup\n  - step: language\n")
        runs, outputs = [], {}
        for workers in args.workers:
            out = work / f"out-{workers}"
            seconds, peak_gb, log = _curate(corpus, out, cfg, workers)
            print("\n".join(line for line in log.splitlines() if line.startswith("[curate]")), flush=True)
            runs.append({"workers": workers, "seconds": round(seconds, 1), "records_per_s": round(args.n / seconds),
                         "peak_rss_gb": round(peak_gb, 2)})
            outputs[workers] = _digest(out)
        out = work / f"out-{args.workers[0]}"
        kept = {json.loads(line)["id"] for line in (out / "records.jsonl").open(encoding="utf-8")}
        removed = {}
        for line in (out / "removed.jsonl").open(encoding="utf-8"):
            e = json.loads(line)
            removed[e["id"]] = e["reason"]
        # dedup's default exact key is the first user turn (Koala's rule), so a near copy of a conversation with the
        # same question is an exact duplicate by that key; either reason counts as found.
        dup = {"exact_duplicate", "near_duplicate"}
        expect = {"exact": dup, "near": dup, **{lang: {"language"} for lang in OTHER}}
        hit: Counter = Counter()
        lost = clean_removed = 0
        for line in corpus.open(encoding="utf-8"):
            rec = json.loads(line)
            kind, rid = rec["meta"]["planted"], rec["id"]
            if rid not in kept and rid not in removed:
                lost += 1
            if kind == "clean":
                clean_removed += rid in removed
            elif removed.get(rid) in expect[kind]:
                hit[kind] += 1
    recall = {k: round(hit[k] / planted[k], 4) for k in planted if k != "clean"}
    same = len(set(outputs.values())) == 1
    result = {"records": args.n, "runs": runs, "kept": len(kept), "removed": len(removed), "lost": lost,
              "recall": recall, "clean_removed": clean_removed, "clean": planted["clean"],
              "same_output_for_every_worker_count": same}
    print(json.dumps(result, indent=2))
    for r in runs:
        print(f"curate {args.n:,} records, {r['workers']} worker(s): {r['records_per_s']:,} records/s, peak RSS of "
              f"all its processes {r['peak_rss_gb']:.2f} GB; peak/goal ratio {r['peak_rss_gb'] / 4:.2f} (goal <= 4 GB)")
    if len(runs) > 1:
        print(f"speed ratio {runs[-1]['workers']} workers / {runs[0]['workers']}: "
              f"{runs[-1]['records_per_s'] / runs[0]['records_per_s']:.2f}")
    print(f"every input accounted for: {lost == 0}; identical outputs across worker counts: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if lost == 0 and same else 1


def _curate(corpus: Path, out: Path, cfg: Path, workers: int) -> tuple[float, float, str]:
    """Seconds, peak summed RSS of curate's process tree (sampled every 0.2 s), and its log."""
    import psutil

    log = out.with_suffix(".log")
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "protege.cli", "curate", str(corpus), "--out", str(out),
                                 "--config", str(cfg), f"--workers={workers}"], stdout=fh, stderr=subprocess.STDOUT)
        top, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                rss = sum(p.memory_info().rss for p in [top, *top.children(recursive=True)])
            except psutil.Error:  # a worker ended between listing and reading
                continue
            peak = max(peak, rss)
            time.sleep(0.2)
    seconds = time.perf_counter() - t0
    text = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"curate failed:\n{text[-3000:]}")
    return seconds, peak / 2**30, text


def _digest(out: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in ("records.jsonl", "removed.jsonl"):
        with (out / name).open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


if __name__ == "__main__":
    sys.exit(main())
