"""The exact bytes each token id stands for, for any HF tokenizer (byte-level BPE or SentencePiece).

Two readers need them: bits per byte in pretraining (bytes per token) and the server's `logprobs`
(OpenAI's `bytes` field, which a client joins to rebuild characters split across tokens). A token's
decoded text cannot give them: a token holding half a UTF-8 character decodes to U+FFFD.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["TokenBytes"]


@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: each of the 256 bytes is one printable character in a token's
    string (printable ASCII and Latin-1 stand for themselves; the rest are shifted to U+0100 and up). The
    mapping is part of every byte-level tokenizer file format, and `tokenizers` does not expose it."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, shift = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shift)] = b
            shift += 1
    return chars


class TokenBytes:
    """`bytes_of(id)` and `is_special(id)` for one tokenizer; build it once (it walks the vocabulary)."""

    def __init__(self, tok: PreTrainedTokenizerBase):
        vocab = tok.get_vocab()
        self.size = max(max(vocab.values()) + 1, len(tok))
        self.special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
        decoder = ""
        if hasattr(tok, "backend_tokenizer"):
            decoder = json.dumps(json.loads(tok.backend_tokenizer.to_str()).get("decoder"))
        self.byte_level = "ByteLevel" in decoder
        table = _byte_level_decoder()
        self._bytes: list[bytes] = [b""] * self.size
        for piece, i in vocab.items():
            if i in self.special:
                self._bytes[i] = piece.encode("utf-8")  # its literal text: what a client sees for it
            elif self.byte_level and all(c in table for c in piece):
                self._bytes[i] = bytes(table[c] for c in piece)
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
                self._bytes[i] = bytes([int(piece[3:5], 16)])
            else:
                self._bytes[i] = piece.replace("\u2581", " ").encode("utf-8")

    def bytes_of(self, token_id: int) -> bytes:
        return self._bytes[token_id] if 0 <= token_id < self.size else b""

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special

    def text_of(self, token_id: int) -> str:
        """The token as a string; bytes that are not whole UTF-8 characters are written `\\xNN`, as OpenAI does."""
        return self.bytes_of(token_id).decode("utf-8", errors="backslashreplace")

    def byte_lengths(self) -> list[int]:
        """UTF-8 bytes per id, 0 for special tokens (the denominator of bits per byte)."""
        return [0 if i in self.special else len(b) for i, b in enumerate(self._bytes)]

