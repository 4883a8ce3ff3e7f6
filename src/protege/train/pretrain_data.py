"""Pretraining data: a corpus tokenized once into a flat token file, read back as packed rows.

Tokenizing streams the corpus document by document (`corpus.iter_documents`) and appends the ids to
`train.bin` / `val.bin` (uint16 when the vocabulary fits, else uint32), so memory stays bounded
whatever the corpus size, and the files are memory-mapped afterwards (nanoGPT's and litgpt's layout).
A `tokens.json` beside them records what they were made from; a rerun with the same sources and
tokenizer reuses them, a run killed while tokenizing starts the tokenizing over (the files are only
renamed into place when complete).

Each document is written as `[BOS] ids [EOS]` — one `<|endoftext|>` between documents when BOS and EOS
are the same token, as GPT-2 does. Row r of the stream is tokens[r*T : r*T+T+1] (inputs and shifted
targets). Attention never crosses a document: positions restart at every BOS, and transformers turns
restarting `position_ids` into a block-diagonal causal mask (the same mechanism as SFT's packing). The
one target that crosses a boundary, EOS -> next BOS, is not learned.

Micro-batch i is a fixed function of (seed, i): rows are visited in a seeded permutation per epoch, so
a resumed run reads exactly the batches an uninterrupted one would, and ranks split them by index.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import torch

from ..errors import StageError
from ..files import atomic_path, atomic_write_json
from .losses import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["TokenFiles", "tokenize_corpus", "PackedRows", "rows_to_batch", "token_byte_lengths", "doc_tokens", "corpus_key"]


@dataclass
class TokenFiles:
    train: Path
    val: Path
    dtype: str
    meta: dict[str, Any]

    def load(self, split: str) -> np.ndarray:
        path = self.train if split == "train" else self.val
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")


def doc_tokens(tok: PreTrainedTokenizerBase) -> tuple[int, int]:
    """(bos, eos) ids framing a document: the tokenizer's BOS (else EOS) and EOS."""
    eos = tok.eos_token_id
    if isinstance(eos, list):
        eos = eos[0]
    bos = tok.bos_token_id if tok.bos_token_id is not None else eos
    if bos is None:
        raise StageError("pretrain: the tokenizer has neither a BOS nor an EOS token to separate documents")
    return int(bos), int(eos if eos is not None else bos)


def tokenize_corpus(sources: Sequence[str], tok: PreTrainedTokenizerBase, cache_dir: Path, *, text_field: str, separator: str,
                    val_fraction: float, key: dict[str, Any], progress: bool = True,
                    batch_docs: int = 512) -> TokenFiles:
    """Tokenize every document of `sources` into cache_dir/{train,val}.bin (reused when `key` matches)."""
    from tqdm.auto import tqdm

    from ..corpus import held_out, iter_documents

    dtype = "uint16" if len(tok) <= 65535 else "uint32"
    meta_path = cache_dir / "tokens.json"
    files = TokenFiles(cache_dir / "train.bin", cache_dir / "val.bin", dtype, {})
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key and files.train.exists() and files.val.exists():
            files.meta = meta
            return files
    cache_dir.mkdir(parents=True, exist_ok=True)
    bos, eos = doc_tokens(tok)
    frame = ([bos], [eos] if eos != bos else [])
    counts = {"train": [0, 0, 0], "val": [0, 0, 0]}  # documents, tokens, utf-8 bytes
    bar = tqdm(desc="tokenize", unit="doc", disable=not progress, dynamic_ncols=True)
    # Both files are written beside their names and renamed in only when complete (`atomic_path`).
    with contextlib.ExitStack() as stack:
        handles = {split: stack.enter_context(stack.enter_context(atomic_path(path, ".partial")).open("wb"))
                   for split, path in (("train", files.train), ("val", files.val))}
        stack.callback(bar.close)

        def flush(docs: list[str], split: str) -> None:
            if not docs:
                return
            ids = tok(docs, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            flat = np.fromiter((t for one in ids for t in (*frame[0], *one, *frame[1])), dtype=dtype)
            handles[split].write(flat.tobytes())
            c = counts[split]
            c[0] += len(docs)
            c[1] += int(flat.size)
            c[2] += sum(len(d.encode("utf-8", "surrogatepass")) for d in docs)
            bar.update(len(docs))

        pending: dict[str, list[str]] = {"train": [], "val": []}
        for source in sources:
            for doc in iter_documents(source, text_field, separator):
                split = "val" if held_out(doc, val_fraction) else "train"
                pending[split].append(doc)
                if len(pending[split]) >= batch_docs:
                    flush(pending[split], split)
                    pending[split] = []
        for split, docs in pending.items():
            flush(docs, split)
    meta = {"key": key, "dtype": dtype, "bos": bos, "eos": eos,
            **{f"{s}_{k}": counts[s][i] for s in counts for i, k in enumerate(("documents", "tokens", "bytes"))}}
    atomic_write_json(meta_path, meta)  # last: the files count only once it names them
    files.meta = meta
    return files


class PackedRows(Sequence[list[int]]):
    """Micro-batches (lists of row starts) of a token stream, in a seeded order, addressable by index.

    Epoch e visits all `n_rows` rows of `seq_len + 1` tokens in permutation(seed + e); micro-batch i is
    rows [i*B, (i+1)*B) of the concatenated epochs. With `shuffle=False` (held-out data) rows go in order.
    Nothing but the current epoch's permutation is held in memory (8 bytes per row).
    """

    def __init__(self, n_tokens: int, seq_len: int, batch_size: int, epochs: float, seed: int, shuffle: bool = True):
        self.seq_len, self.batch_size, self.seed, self.shuffle = seq_len, batch_size, seed, shuffle
        self.n_rows = max(0, (n_tokens - 1) // seq_len)
        self.total_rows = int(self.n_rows * epochs)
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.total_rows // self.batch_size

    def _row(self, k: int) -> int:
        epoch, r = divmod(k, self.n_rows)
        if not self.shuffle:
            return r * self.seq_len
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng(self.seed + epoch).permutation(self.n_rows))
        return int(self._perm[1][r]) * self.seq_len

    def __getitem__(self, i: int | slice) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return [self._row(i * self.batch_size + j) for j in range(self.batch_size)]


def rows_to_batch(tokens: np.ndarray, starts: Iterable[int], seq_len: int, bos: int, eos: int) -> dict[str, torch.Tensor]:
    """(B, T) input_ids, position_ids restarting at every BOS, and shifted labels (EOS -> BOS unlearned)."""
    rows = np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
    x = torch.from_numpy(rows)
    inputs, targets = x[:, :-1], x[:, 1:].clone()
    idx = torch.arange(seq_len).expand_as(inputs)
    starts_at = torch.where(inputs == bos, idx, torch.zeros_like(idx))
    positions = idx - torch.cummax(starts_at, dim=1).values
    if bos != eos:
        targets[(inputs == eos) & (targets == bos)] = IGNORE_INDEX
    return {"input_ids": inputs.contiguous(), "position_ids": positions.contiguous(), "labels": targets}


def token_byte_lengths(tok: PreTrainedTokenizerBase) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (0 for special tokens): the denominator of bits per byte."""
    from ..tokens import TokenBytes

    return torch.tensor(TokenBytes(tok).byte_lengths(), dtype=torch.long)


def corpus_key(sources: Sequence[str], tok_dir: str, text_field: str, separator: str, val_fraction: float) -> dict[str, Any]:
    """What the token files depend on: each source's content hash, the tokenizer's files, the split."""
    from ..corpus import describe_source
    from ..files import sha256_path

    tok_hash = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        p = Path(tok_dir) / name
        if p.exists():
            tok_hash.update(sha256_path(p).encode())
    return {"sources": [describe_source(s) for s in sources], "tokenizer": tok_hash.hexdigest(),
            "text_field": text_field, "separator": separator, "val_fraction": val_fraction}
