"""Vectorised MinHash + LSH near-duplicate clustering (numpy), for 100K+ conversations in seconds.

Why hand-written rather than datasketch: the straightforward datasketch usage calls
`MinHash.update` once per shingle, i.e. one Python call plus a numpy op over all
permutations for each of ~200 shingles per document (20M calls for 100K documents).
Here every step works on whole arrays:

1. words -> ids with one dict per run, each distinct word hashed once (xxhash64);
2. word n-gram (shingle) hashes by combining shifted word-hash arrays, one 32-bit value each;
3. MinHash signatures: for a block of documents, all permutations over all their shingles
   at once, `h_p(x) = (a_p * x + b_p) mod 2**32` (odd `a_p`: a bijection of 32-bit values)
   laid out (num_perm, shingles) so the per-document minimum is a contiguous `reduceat`;
4. LSH: each band of `r` rows hashed to one uint64 key; equal keys found by sorting;
5. candidate pairs verified by estimated Jaccard (fraction of equal signature rows);
   union-find over verified pairs gives the clusters.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import xxhash

from .common import words as split_words

__all__ = ["shingle_hashes", "minhash_signatures", "optimal_bands", "candidate_pairs", "estimated_jaccard",
           "NearDuplicates", "text_signatures", "clusters_from_signatures", "near_duplicate_clusters"]

_M = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
               0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9], dtype=np.uint64)
_EMPTY = np.uint32(0xFFFFFFFF)
_CHUNK_DOCS = 5000   # tokenized per chunk: bounds the transient Python word lists (~60 MB)
_BLOCK_SHINGLES = 4096  # shingles per MinHash block: (num_perm, <= 8K) uint32 = 4 MB stays in cache


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: spreads every input bit over the high 32 bits we keep."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shingle_hashes(texts: Sequence[str], ngram: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Word n-gram hashes of every text: (hashes uint32 (S,), offsets int64 (N+1,)).

    Text i owns `hashes[offsets[i]:offsets[i+1]]`. A text with fewer than `ngram` words gets one
    shingle (all its words); a text without words gets none.
    """
    vocab: defaultdict[str, int] = defaultdict(itertools.count().__next__)
    word_hash: list[int] = []
    out, counts = [], np.zeros(len(texts), np.int64)
    for c0 in range(0, len(texts), _CHUNK_DOCS):
        chunk = texts[c0:c0 + _CHUNK_DOCS]
        words = [split_words(t) for t in chunk]
        lens = np.fromiter(map(len, words), np.int64, len(words))
        ids = np.fromiter(map(vocab.__getitem__, itertools.chain.from_iterable(words)), np.int64, int(lens.sum()))
        new = list(vocab)[len(word_hash):] if len(vocab) > len(word_hash) else []
        word_hash.extend(xxhash.xxh64_intdigest(w.encode("utf-8", "surrogatepass")) for w in new)
        wh = np.array(word_hash, dtype=np.uint64)[ids]                        # (W,)
        n = ngram
        # shingle starting at word k = sum_j wh[k+j] * M_j (wrapping uint64), then mixed
        if len(wh) >= n:
            sh = wh[: len(wh) - n + 1] * _M[0]
            for j in range(1, n):
                sh = sh + wh[j: len(wh) - n + 1 + j] * _M[j % len(_M)]
        else:
            sh = np.zeros(0, np.uint64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        doc = np.repeat(np.arange(len(chunk)), lens)
        pos = np.arange(len(wh)) - starts[doc]
        valid = (pos <= lens[doc] - n)[: len(sh)]                             # n-gram inside one text
        hashes = (_mix64(sh[valid]) >> np.uint64(32)).astype(np.uint32)
        counts_chunk = np.bincount(doc[: len(sh)][valid], minlength=len(chunk))
        short = np.flatnonzero((lens > 0) & (lens < n))
        if len(short):  # whole text as its single shingle; insert in document order
            extra = np.array([xxhash.xxh32_intdigest(" ".join(words[i]).encode("utf-8", "surrogatepass")) for i in short], np.uint32)
            offs = np.concatenate([[0], np.cumsum(counts_chunk)])
            hashes = np.insert(hashes, offs[short], extra)
            counts_chunk[short] = 1
        out.append(hashes)
        counts[c0:c0 + len(chunk)] = counts_chunk
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return (np.concatenate(out) if out else np.zeros(0, np.uint32)), offsets


def minhash_signatures(hashes: np.ndarray, offsets: np.ndarray, num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """MinHash signatures, shape (num_perm, N) uint32; a text without shingles gets all 0xFFFFFFFF."""
    rng = np.random.default_rng(seed)
    a = (rng.integers(0, 2**31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1))[:, None]  # odd
    b = rng.integers(0, 2**32, num_perm, dtype=np.uint32)[:, None]
    n = len(offsets) - 1
    sig = np.full((num_perm, n), _EMPTY, np.uint32)
    counts = np.diff(offsets)
    buf = np.empty((num_perm, 2 * _BLOCK_SHINGLES), np.uint32)

    def permuted(x: np.ndarray) -> np.ndarray:
        view = buf[:, : len(x)]
        np.multiply(a, x[None, :], out=view)                                 # (P, S), wraps mod 2**32
        view += b
        return view

    small = np.flatnonzero((counts > 0) & (counts <= _BLOCK_SHINGLES))
    # documents starting in the same budget window form a block: at most 2 * budget shingles
    block = offsets[small] // _BLOCK_SHINGLES
    cuts = np.flatnonzero(np.diff(block)) + 1
    for docs in np.split(small, cuts) if len(small) else []:
        lo, hi = offsets[docs], offsets[docs + 1]
        if hi[-1] - lo[0] == int((hi - lo).sum()):                           # contiguous (no giant doc between)
            x = hashes[lo[0]:hi[-1]]
        else:
            x = np.concatenate([hashes[s:e] for s, e in zip(lo, hi)])
        sig[:, docs] = np.minimum.reduceat(permuted(x), np.concatenate([[0], np.cumsum(hi - lo)[:-1]]), axis=1)
    for d in np.flatnonzero(counts > _BLOCK_SHINGLES):                      # long texts: running minimum
        for s in range(offsets[d], offsets[d + 1], 2 * _BLOCK_SHINGLES):
            x = hashes[s:min(s + 2 * _BLOCK_SHINGLES, offsets[d + 1])]
            np.minimum(sig[:, d], permuted(x).min(axis=1), out=sig[:, d])
    return sig


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.1, fn_weight: float = 0.9) -> tuple[int, int]:
    """(bands, rows) minimizing weighted false-positive/negative area of the LSH S-curve (as datasketch).

    Weighted towards recall: candidates are verified afterwards, so a false candidate costs a
    comparison while a missed pair is a duplicate left in the data.
    """
    lo, hi = np.linspace(0, threshold, 101), np.linspace(threshold, 1, 101)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - lo ** r) ** b, lo)
            fn = np.trapezoid((1 - hi ** r) ** b, hi)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


def candidate_pairs(sig: np.ndarray, bands: int, rows: int, docs: np.ndarray | None = None) -> np.ndarray:
    """Pairs (i < j) sharing a bucket in some band, shape (K, 2) int64; `docs` restricts to those columns."""
    n = sig.shape[1]
    docs = np.arange(n) if docs is None else docs
    codes = []
    for band in range(bands):
        block = sig[band * rows:(band + 1) * rows, docs].astype(np.uint64)   # (r, D)
        key = block[0] * _M[0]
        for j in range(1, rows):
            key = key + _mix64(block[j] + np.uint64(j)) * _M[j % len(_M)]
        order = np.argsort(key, kind="stable")
        ks = key[order]
        first = np.concatenate([[True], ks[1:] != ks[:-1]])
        if first.all():
            continue
        run_start = np.maximum.accumulate(np.where(first, np.arange(len(ks)), 0))
        member = np.flatnonzero(~first)
        # each member pairs with its bucket's first and with its predecessor: linear in bucket
        # size, and enough for union-find to join everything the bucket holds
        for left in (order[run_start[member]], order[member - 1]):
            i, j = docs[left], docs[order[member]]
            codes.append(np.minimum(i, j) * n + np.maximum(i, j))
    if not codes:
        return np.zeros((0, 2), np.int64)
    uniq = np.unique(np.concatenate(codes))
    return np.stack([uniq // n, uniq % n], axis=1)


def estimated_jaccard(sig_rows: np.ndarray, pairs: np.ndarray, block: int = 65536) -> np.ndarray:
    """Fraction of equal MinHash values per pair; `sig_rows` is (N, num_perm)."""
    out = np.empty(len(pairs), np.float64)
    for s in range(0, len(pairs), block):
        p = pairs[s:s + block]
        out[s:s + block] = (sig_rows[p[:, 0]] == sig_rows[p[:, 1]]).mean(axis=1)
    return out


def _union_find(n: int, pairs: np.ndarray) -> np.ndarray:
    """Root (smallest index) of each element's component."""
    parent = np.arange(n)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs.tolist():
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) for i in range(n)]) if len(pairs) else parent


@dataclass
class NearDuplicates:
    """Cluster root per text (the earliest member), and each text's estimated Jaccard to its root."""

    root: np.ndarray
    similarity: np.ndarray
    candidates: int
    bands: int
    rows: int

    def clusters(self) -> list[list[int]]:
        """Clusters with more than one member, largest first (members in input order)."""
        groups: dict[int, list[int]] = defaultdict(list)
        for i in np.flatnonzero(self.root != np.arange(len(self.root))).tolist():
            groups[int(self.root[i])].append(i)
        return sorted(([r, *m] for r, m in groups.items()), key=lambda c: (-len(c), c[0]))


def text_signatures(texts: Sequence[str], ngram: int = 3, num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """MinHash signatures of texts, (num_perm, N) uint32. A text's signature depends on that text alone, so
    chunks of a stream may be signed separately (in parallel) and concatenated along axis 1."""
    hashes, offsets = shingle_hashes(texts, ngram)
    return minhash_signatures(hashes, offsets, num_perm, seed)


def clusters_from_signatures(sig: np.ndarray, threshold: float = 0.5,
                             bands: tuple[int, int] | None = None) -> NearDuplicates:
    """Cluster the columns of `sig` whose estimated Jaccard is >= threshold (LSH + union-find)."""
    n = sig.shape[1]
    b, r = bands or optimal_bands(threshold, sig.shape[0])
    nonempty = np.flatnonzero((sig != _EMPTY).any(axis=0))                   # texts with at least one shingle
    pairs = candidate_pairs(sig, b, r, nonempty)
    rows = np.ascontiguousarray(sig.T)                                         # (N, P) for row gathers
    est = estimated_jaccard(rows, pairs)
    root = _union_find(n, pairs[est >= threshold])
    sim = np.ones(n)
    moved = np.flatnonzero(root != np.arange(n))
    if len(moved):
        sim[moved] = estimated_jaccard(rows, np.stack([root[moved], moved], axis=1))
    return NearDuplicates(root=root, similarity=sim, candidates=len(pairs), bands=b, rows=r)


def near_duplicate_clusters(texts: Sequence[str], ngram: int = 3, threshold: float = 0.5, num_perm: int = 128,
                            seed: int = 1, bands: tuple[int, int] | None = None) -> NearDuplicates:
    """Cluster texts whose estimated word-n-gram Jaccard is >= threshold (MinHash + LSH + union-find)."""
    return clusters_from_signatures(text_signatures(texts, ngram, num_perm, seed), threshold, bands)
