"""Near-dedup throughput: protege's vectorised MinHash/LSH vs straightforward datasketch, one run.

Data: N synthetic conversations (~200 words: a user turn and an answer) drawn from a Zipfian
synthetic vocabulary, 10% of them planted near-duplicates of another conversation with 2-10% of
words edited (substituted, inserted or deleted). Both sides use the same word n-grams, number of
permutations, LSH bands/rows and Jaccard threshold, verify LSH candidates by estimated Jaccard,
and cluster with union-find; recall = planted pairs that end in one cluster.

    python benchmarks/dedup_throughput.py            # 100,000 conversations
    python benchmarks/dedup_throughput.py --n 20000  # smaller, when the machine is busy

Goal (issue 4): >= 3x faster than datasketch, 100K in <= 60 s, recall >= 0.95 for both.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from protege.curate.common import words
from protege.curate.minhash import near_duplicate_clusters, optimal_bands

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "da", "gu", "ze", "fa", "bi", "to",
              "re", "an", "el", "or", "us", "qui", "mo", "sa", "te", "ni"]


def synthetic_corpus(n: int, seed: int = 0, dup_fraction: float = 0.1) -> tuple[list[str], np.ndarray]:
    """(texts, group): group[i] is the index of the original a planted near-duplicate copies (else i)."""
    rng = np.random.default_rng(seed)
    vocab = np.array(sorted({"".join(rng.choice(_SYLLABLES, size=rng.integers(2, 5))) for _ in range(30000)}))
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.05
    p /= p.sum()
    n_orig = n - int(n * dup_fraction)
    lengths = rng.integers(170, 231, size=n_orig)
    flat = vocab[rng.choice(len(vocab), size=int(lengths.sum()), p=p)].tolist()
    docs, start = [], 0
    for length in lengths.tolist():
        w = flat[start:start + length]
        start += length
        docs.append(w)
    group = np.arange(n)
    texts = [" ".join(w[:30]) + "?\n" + " ".join(w[30:]) + "." for w in docs]
    for k in range(n_orig, n):
        src = int(rng.integers(0, n_orig))
        w = list(docs[src])
        for _ in range(max(1, int(len(w) * rng.uniform(0.02, 0.10)))):
            op, pos = rng.integers(0, 3), int(rng.integers(0, len(w)))
            new = str(vocab[rng.integers(0, len(vocab))])
            if op == 0:
                w[pos] = new
            elif op == 1:
                w.insert(pos, new)
            elif len(w) > 40:
                del w[pos]
        texts.append(" ".join(w[:30]) + "?\n" + " ".join(w[30:]) + ".")
        group[k] = src
    return texts, group


def datasketch_clusters(texts: list[str], ngram: int, threshold: float, num_perm: int,
                        bands: tuple[int, int]) -> np.ndarray:
    """The straightforward datasketch usage: MinHash.update per shingle, MinHashLSH.query then insert."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=bands)
    parent = list(range(len(texts)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    sketches = []
    for i, text in enumerate(texts):
        w = words(text)
        m = MinHash(num_perm=num_perm)
        for k in range(max(1, len(w) - ngram + 1)):
            m.update(" ".join(w[k:k + ngram]).encode("utf-8"))
        for other in lsh.query(m):
            if m.jaccard(sketches[other]) >= threshold:
                ri, rj = find(i), find(other)
                parent[max(ri, rj)] = min(ri, rj)
        lsh.insert(i, m)
        sketches.append(m)
    return np.array([find(i) for i in range(len(texts))])


def scores(root: np.ndarray, group: np.ndarray) -> tuple[float, float]:
    """(recall of planted pairs in one cluster, precision of clustered non-root members)."""
    planted = np.flatnonzero(group != np.arange(len(group)))
    recall = float((root[planted] == root[group[planted]]).mean()) if len(planted) else 1.0
    members = np.flatnonzero(root != np.arange(len(root)))
    precision = float((group[members] == group[root[members]]).mean()) if len(members) else 1.0
    return recall, precision


def pipeline_time(texts: list[str], args: argparse.Namespace) -> None:
    """The dedup step inside a full curate run: JSONL in, records/removed/card/manifest out."""
    import json
    import tempfile
    from pathlib import Path

    from protege.curate import CurateConfig, run

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "conversations.jsonl"
        with src.open("w", encoding="utf-8") as fh:
            for i, t in enumerate(texts):
                user, answer = t.split("\n", 1)
                fh.write(json.dumps({"id": f"c{i}", "messages": [{"role": "user", "content": user},
                                                                {"role": "assistant", "content": answer}]}) + "\n")
        cfg = CurateConfig(inputs=[str(src)], out_dir=str(Path(tmp) / "out"),
                           steps=[{"step": "dedup", "exact": "conversation", "ngram": args.ngram,
                                   "threshold": args.threshold, "num_perm": args.num_perm}])
        t0 = time.perf_counter()
        summary = run(cfg)
        print(f"protege curate (read + dedup step + write + card): {time.perf_counter() - t0:.1f} s, "
              f"{summary['removed']:,} removed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="conversations")
    ap.add_argument("--ngram", type=int, default=3)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--pipeline", action="store_true",
                    help="also time the whole `protege curate` stage (read JSONL, dedup step, write outputs and card)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    texts, group = synthetic_corpus(args.n)
    words_total = sum(len(t.split()) for t in texts)
    print(f"data: {len(texts):,} conversations, {words_total / len(texts):.0f} words each on average, "
          f"{int((group != np.arange(len(group))).sum()):,} planted near-duplicates ({time.perf_counter() - t0:.1f} s to make)")
    bands = optimal_bands(args.threshold, args.num_perm)
    print(f"params: word {args.ngram}-grams, {args.num_perm} permutations, LSH {bands[0]} bands x {bands[1]} rows, "
          f"Jaccard threshold {args.threshold}")

    # wall time and this process's CPU time: on a shared machine the CPU-time ratio is the fairer one
    t0, c0 = time.perf_counter(), time.process_time()
    nd = near_duplicate_clusters(texts, args.ngram, args.threshold, args.num_perm, bands=bands)
    t_protege, c_protege = time.perf_counter() - t0, time.process_time() - c0
    r, p = scores(nd.root, group)
    print(f"protege     : {t_protege:8.1f} s wall {c_protege:8.1f} s CPU  {len(texts) / t_protege:9,.0f} conv/s  "
          f"recall {r:.4f}  precision {p:.4f}  ({nd.candidates:,} candidate pairs)")
    if args.skip_baseline:
        if args.pipeline:
            pipeline_time(texts, args)
        return
    t0, c0 = time.perf_counter(), time.process_time()
    root = datasketch_clusters(texts, args.ngram, args.threshold, args.num_perm, bands)
    t_ds, c_ds = time.perf_counter() - t0, time.process_time() - c0
    r, p = scores(root, group)
    print(f"datasketch  : {t_ds:8.1f} s wall {c_ds:8.1f} s CPU  {len(texts) / t_ds:9,.0f} conv/s  "
          f"recall {r:.4f}  precision {p:.4f}")
    print(f"speedup     : {t_ds / t_protege:.1f}x wall, {c_ds / c_protege:.1f}x CPU "
          f"(goal >= 3x; protege goal <= 60 s for 100K)")
    if args.pipeline:
        pipeline_time(texts, args)


if __name__ == "__main__":
    main()
