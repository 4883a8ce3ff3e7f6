"""`protege train tokenizer`: a byte-level BPE trained on a corpus with Hugging Face `tokenizers`.

Byte-level means the 256 bytes are the base alphabet: any string, in any script, with any control
character, encodes and decodes back exactly, and nothing is ever unknown (the job sentencepiece's byte
fallback does). Text is first split with GPT-4's pattern (letters, 1-3 digit numbers, punctuation runs,
whitespace), as nanochat and tiktoken do, so merges never cross a word boundary.

The result is a normal HF tokenizer folder (`PreTrainedTokenizerFast`) with ChatML's special tokens and
chat template: `<|endoftext|>` ends a pretraining document, `<|im_start|>`/`<|im_end|>` frame chat turns,
so `train pretrain`, SFT, the engine and the server take it as they take any other tokenizer.
It also reports compression (UTF-8 bytes per token) on held-out documents beside the built-in models'
tokenizers (those that are pulled).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from pydantic import Field

from ..config import StageConfig
from ..errors import StageError
from ..manifest import StageRun

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["TokenizerConfig", "SPECIAL_TOKENS", "GPT4_SPLIT", "run", "bytes_per_token"]

# GPT-4's (cl100k) pre-tokenizer split, as nanochat uses it.
GPT4_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
COMPARE_WITH = ("gemma-3-270m", "smollm2-135m-instruct")


class TokenizerConfig(StageConfig):
    """byte-level BPE tokenizer trained on a corpus (HF tokenizers), with ChatML special tokens"""

    datasets: list[str] = Field(default_factory=lambda: ["builtin:python-docs"],
                                description="corpus sources: .txt/.jsonl/.parquet files, datasets:PATH_OR_NAME, builtin:python-docs")
    out_dir: str = Field("runs/tokenizer", description="where the tokenizer folder, compression report and manifest go")
    vocab_size: int = Field(8192, ge=256 + len(SPECIAL_TOKENS), description="tokens in the vocabulary, special tokens included")
    min_frequency: int = Field(2, ge=1, description="a merge must occur this often")
    max_chars: int = Field(500_000_000, ge=1, description="characters of training text read at most (the rest is not needed to learn merges)")
    doc_cap: int = Field(10_000, ge=1, description="characters of one document used for training at most (a few huge documents must not dominate)")
    text_field: str = Field("text", description="the field (.jsonl, datasets) or column (.parquet) that holds the text")
    separator: str = Field("<|endoftext|>", description="what separates documents in .txt files (a file without it is one document)")
    held_out_fraction: float = Field(0.01, ge=0.0, lt=1.0, description="documents (by hash) kept out of training and used to measure compression")
    compare: list[str] = Field(default_factory=lambda: list(COMPARE_WITH),
                               description="tokenizers (aliases or folders) measured on the same held-out text; skipped if not pulled")


def _training_text(config: TokenizerConfig, held: list[str]) -> Iterator[str]:
    from ..corpus import held_out, iter_documents

    budget, held_chars = config.max_chars, 0
    for source in config.datasets:
        for doc in iter_documents(source, config.text_field, config.separator):
            if held_out(doc, config.held_out_fraction):
                if held_chars < 2_000_000:  # enough to measure compression to 3 digits
                    held.append(doc)
                    held_chars += len(doc)
                continue
            piece = doc[: config.doc_cap]
            yield piece
            budget -= len(piece)
            if budget <= 0:
                return


def build(config: TokenizerConfig, texts: Iterator[str]) -> Any:
    """Train the BPE on `texts` and wrap it as a transformers fast tokenizer with ChatML's template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..chat import CHATML_TEMPLATE

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=True)
    core.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|pad|>", model_max_length=1 << 20)
    tok.chat_template = CHATML_TEMPLATE
    return tok


def bytes_per_token(tok: PreTrainedTokenizerBase, docs: list[str]) -> float | None:
    """UTF-8 bytes per token over `docs`, encoded as plain text (special-token strings not parsed)."""
    if not docs:
        return None
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_tokens = sum(len(ids) for ids in tok(docs, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    return round(n_bytes / max(n_tokens, 1), 4)


def _compare(names: list[str], docs: list[str]) -> dict[str, float | str]:
    from transformers import AutoTokenizer

    from ..models.registry import ALIASES, alias_dir

    out: dict[str, float | str] = {}
    for name in names:
        path = alias_dir(name) / "hf" if name in ALIASES else Path(name)
        if not (Path(path) / "tokenizer_config.json").exists() and not (Path(path) / "tokenizer.json").exists():
            out[name] = "not pulled"
            continue
        out[name] = bytes_per_token(AutoTokenizer.from_pretrained(str(path)), docs) or 0.0
    return out


def run(config: TokenizerConfig) -> dict[str, Any]:
    from ..files import atomic_write_json

    stage = StageRun("train.tokenizer", config, config.out_dir)
    out_dir = stage.out
    held: list[str] = []
    n_chars = 0

    def counted() -> Iterator[str]:
        nonlocal n_chars
        for text in _training_text(config, held):
            n_chars += len(text)
            yield text

    tok = build(config, counted())
    if n_chars == 0:
        raise StageError(f"train tokenizer: no training text in {config.datasets} (every document empty or held out)")
    target = out_dir / "tokenizer"
    tok.save_pretrained(str(target))
    compression = {"protege": bytes_per_token(tok, held), **_compare(config.compare, held)}
    summary = {"vocab_size": len(tok), "training_chars": n_chars, "held_out_documents": len(held),
               "held_out_bytes": sum(len(d.encode()) for d in held), "bytes_per_token": compression}
    atomic_write_json(out_dir / "compression.json", summary)
    stage.finish(inputs=[d for d in config.datasets if Path(d).is_file()], outputs=[target, out_dir / "compression.json"],
                 counts=summary)
    print(f"[protege tokenizer] vocab {len(tok)}, trained on {n_chars:,} chars; held-out bytes/token: "
          + ", ".join(f"{k} {v}" for k, v in compression.items()))
    return summary
