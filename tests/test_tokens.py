"""`TokenBytes`: the exact bytes of every token, for byte-level BPE and SentencePiece-style vocabularies."""

from __future__ import annotations

import pytest

from protege.tokens import TokenBytes

TEXTS = ["plain ascii", "naïve café", "日本語のテキスト", "emoji 👩‍👩‍👧 and ✨", "tabs\tand\nnewlines  ", "€ ∑ 𝔘"]


def _joined(tb: TokenBytes, ids: list[int]) -> bytes:
    return b"".join(tb.bytes_of(i) for i in ids)


def test_byte_level_tokens_join_to_the_texts_utf8(tiny_llama):
    _, tok = tiny_llama
    tb = TokenBytes(tok)
    assert tb.byte_level
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert _joined(tb, ids) == text.encode("utf-8"), text
    # a token holding part of a character is shown as escaped bytes, not U+FFFD
    partial = [i for i in range(tb.size) if not tb.is_special(i) and len(tb.bytes_of(i)) == 1 and tb.bytes_of(i)[0] >= 0x80]
    assert partial and tb.text_of(partial[0]).startswith("\\x")
    assert tb.byte_lengths()[tok.eos_token_id] == 0 and tb.bytes_of(tok.eos_token_id) == tok.eos_token.encode()


def test_sentencepiece_style_tokens_join_to_the_texts_utf8():
    """Gemma / Llama-2 style: `▁` for spaces, `<0xNN>` byte pieces for what the vocabulary lacks."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<eos>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁"] + [chr(c) for c in range(33, 127)]
    pieces += ["▁a", "ai", "in"]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a"), ("a", "i"), ("i", "n")], unk_token="<unk>",
                              byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")
    tb = TokenBytes(tok)
    assert not tb.byte_level
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert _joined(tb, ids) == text.encode("utf-8"), (text, tok.convert_ids_to_tokens(ids))


@pytest.mark.parametrize("piece, expected", [("<0xE2>", b"\xe2"), ("\u2581the", b" the"), ("é", "é".encode())])
def test_sentencepiece_piece_rules(piece, expected):
    class Tok:
        all_special_ids: list[int] = []

        def get_vocab(self):
            return {piece: 0}

        def __len__(self):
            return 1

    assert TokenBytes(Tok()).bytes_of(0) == expected
