"""Tiny seeded random models and an in-process tokenizer for tests and smoke runs (no network)."""

from __future__ import annotations

from typing import Any

__all__ = ["tiny_tokenizer", "tiny_model"]

_TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a short poem about the sea. The sea is wide and blue.",
    "What is two plus three? Two plus three is five.",
    "Name the capital of France. The capital of France is Paris.",
    "Explain photosynthesis step by step: plants turn light, water and carbon dioxide into sugar.",
    "Translate hello to French. Bonjour. Classify the sentiment: positive, negative, neutral.",
    "SELECT name FROM users WHERE age > 30; def add(a, b): return a + b",
    "0123456789 +-*/=()[]{}<>:;,.!?'\"#@$%^&_|~` \n\t",
]


def tiny_tokenizer(kind: str = "chatml") -> Any:
    """A byte-level BPE tokenizer (vocab 512) trained in-process: covers any text, no download.

    `kind` picks its special tokens: "chatml" (<|im_start|>, <|im_end|>), "gemma"
    (<start_of_turn>, <end_of_turn>) or "plain" (only BOS/EOS/PAD, so the plain template is used).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {"chatml": ["<|im_start|>", "<|im_end|>"], "gemma": ["<start_of_turn>", "<end_of_turn>"],
                "plain": []}[kind]
    base = ["<pad>", "<bos>", "<eos>", "<unk>"]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=base + specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_TINY_CORPUS * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=specials)
    return tok


def tiny_model(arch: str = "llama", seed: int = 0, tokenizer_kind: str | None = None) -> tuple[Any, Any]:
    """A seeded random causal LM (2 layers, width 32) and a matching tiny tokenizer, for tests.

    `arch` is "llama" or "gemma" (Gemma-3 text architecture, tied embeddings, sliding layers).
    """
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    tok = tiny_tokenizer(tokenizer_kind or ("gemma" if arch == "gemma" else "chatml"))
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=False)
    elif arch == "gemma":
        config = Gemma3TextConfig(**common, head_dim=8, sliding_window=16, query_pre_attn_scalar=8,
                                  layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; expected llama or gemma")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model, tok
