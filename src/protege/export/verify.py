"""Checks that an exported GGUF is the model protege trained, run in llama.cpp itself.

- greedy parity: llama.cpp's greedy continuation of N chat prompts (the same prompt ids) equals
  protege's engine on the fp32 HF folder for the first K tokens (or until end of turn);
- template: the prompt llama.cpp builds for a 3-turn conversation from the GGUF's own template and
  BOS rule is token for token what `ChatFormat.encode_prompt` gives, and llama.cpp's generation stops
  at the end-of-turn token;
- quality per file: perplexity on held-out text vs the HF fp32 model (same token ids), size, speed.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..engine.gguf import read_metadata
from ..files import jsonl_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from ..chat import ChatFormat
    from ..engine import Engine

__all__ = ["greedy_parity", "template_check", "perplexity_hf", "perplexity_gguf", "load_texts",
           "VERIFY_PROMPTS"]

VERIFY_PROMPTS = [
    "What is the capital of France?", "Write a haiku about autumn.", "Explain photosynthesis in one sentence.",
    "List three prime numbers.", "How do I boil an egg?", "Translate 'good morning' into Spanish.",
    "What is 12 times 7?", "Give me a tip for learning to code.", "Describe the colour blue to a child.",
    "Why is the sky blue?", "Name a famous painting.", "What does a compiler do?",
    "Suggest a name for a cat.", "Summarise the plot of Cinderella.", "What is the boiling point of water?",
    "Write one sentence about the moon.",
]


def _llama_greedy(llm: Any, prompt: list[int], n: int, stop: set[int]) -> list[int]:
    out: list[int] = []
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if tok in stop or len(out) >= n:
            break
    return out


def greedy_parity(llm: Any, engine: Engine, chat: ChatFormat, n_prompts: int, n_tokens: int) -> dict[str, Any]:
    """Per prompt: do llama.cpp and protege's engine pick the same greedy tokens?"""
    from ..engine import SamplingParams

    stop = set(chat.stop_token_ids)
    prompts = [chat.encode_prompt([{"role": "user", "content": p}]) for p in VERIFY_PROMPTS[:n_prompts]]
    ours = engine.generate(prompts, SamplingParams(max_new_tokens=n_tokens, temperature=0.0))
    rows = []
    for prompt, mine in zip(prompts, ours):
        expect = mine.token_ids[:n_tokens]
        theirs = _llama_greedy(llm, prompt, len(expect), stop)
        same = next((i for i, (a, b) in enumerate(zip(expect, theirs)) if a != b), min(len(expect), len(theirs)))
        row = {"prompt_tokens": len(prompt), "compared": len(expect), "agree_prefix": same, "equal": theirs == expect}
        if not row["equal"] and same < min(len(expect), len(theirs)):
            # How close was the fp32 model to llama.cpp's choice there? A flip at a near-tie is rounding
            # (F16 weights); a flip at a wide margin is a conversion bug.
            with torch.no_grad():
                logits = engine.model(input_ids=torch.tensor([prompt + expect[:same]])).logits[0, -1].float()
            row["fp32_margin_at_divergence"] = float(logits[expect[same]] - logits[theirs[same]])
        rows.append(row)
    margins = [r["fp32_margin_at_divergence"] for r in rows if "fp32_margin_at_divergence" in r]
    return {"prompts": len(rows), "equal": sum(r["equal"] for r in rows), "tokens": n_tokens,
            "max_margin_at_divergence": max(margins) if margins else None, "rows": rows}


def template_check(llm: Any, gguf_path: Path, chat: ChatFormat) -> dict[str, Any]:
    """llama.cpp's own rendering (its Jinja formatter, the GGUF's template and add_bos) vs ChatFormat."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    meta = read_metadata(gguf_path)
    template = meta.get("tokenizer.chat_template")
    conversation = [{"role": "user", "content": "Hi! Who are you?"},
                    {"role": "assistant", "content": "I am a small assistant."},
                    {"role": "user", "content": "Name one colour."}]
    expected = chat.encode_prompt(conversation)
    if not template:
        return {"ok": False, "problem": "the GGUF has no tokenizer.chat_template", "expected_tokens": len(expected)}
    tok = chat.tokenizer
    formatter = Jinja2ChatFormatter(template=template, eos_token=tok.eos_token or "", bos_token=tok.bos_token or "",
                                    add_generation_prompt=True)
    rendered = formatter(messages=conversation).prompt
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    got = [int(t) for t in llm.tokenize(rendered.encode("utf-8"), add_bos=add_bos, special=True)]
    first_diff = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    # Does generation stop at end of turn? Feed a finished answer's prompt and let llama.cpp continue.
    stop = set(chat.stop_token_ids)
    continuation = _llama_greedy(llm, got, 64, stop)
    return {"ok": got == expected, "expected_tokens": len(expected), "llama_cpp_tokens": len(got),
            "first_difference": None if got == expected else first_diff, "add_bos_token": add_bos,
            "double_bos": len(got) > 1 and got[0] == got[1] == tok.bos_token_id,
            "stops_at_end_of_turn": bool(continuation) and continuation[-1] in stop,
            "continuation_tokens": len(continuation)}


def load_texts(path: str | None, n: int) -> list[str]:
    """Held-out text for perplexity: a JSONL of {"text"} / records, or protege's seed tasks by default."""
    from importlib import resources

    texts: list[str] = []
    if path:
        for _, obj in jsonl_rows(path):
            if isinstance(obj.get("text"), str):
                texts.append(obj["text"])
            elif isinstance(obj.get("messages"), list):
                texts.append("\n\n".join(str(m.get("content", "")) for m in obj["messages"]))
    else:
        # The Self-Instruct seed tasks ship with protege and are not what a student is trained on.
        seed = resources.files("protege.generate").joinpath("data/seed_tasks.jsonl").read_text(encoding="utf-8")
        for _, obj in jsonl_rows("seed_tasks.jsonl", text=seed):
            body = "\n".join(x for x in (obj.get(k) for k in ("instruction", "input", "output")) if isinstance(x, str) and x)
            if len(body) > 80:
                texts.append(body)
    return texts[:n]


def _token_ids(tok: PreTrainedTokenizerBase, texts: list[str], add_bos: bool, max_tokens: int) -> list[list[int]]:
    out = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"][: max_tokens - 1]
        if add_bos and tok.bos_token_id is not None:
            ids = [tok.bos_token_id] + ids
        out.append(ids)
    return out


def perplexity_hf(model: torch.nn.Module, ids: list[list[int]]) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for seq in ids:
            x = torch.tensor([seq])
            logits = model(input_ids=x).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            count += len(seq) - 1
    return math.exp(nll / count)


def perplexity_gguf(llm: Any, ids: list[list[int]]) -> tuple[float, float]:
    """(perplexity, prompt-processing tokens/s) of the same token ids in llama.cpp."""
    import numpy as np

    nll, count, seconds = 0.0, 0, 0.0
    for seq in ids:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(seq)
        seconds += time.perf_counter() - t0
        logits = np.asarray(llm.scores[: len(seq) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= float(logp[np.arange(len(seq) - 1), seq[1:]].sum())
        count += len(seq) - 1
    return math.exp(nll / count), sum(len(s) for s in ids) / max(seconds, 1e-9)


def decode_speed(llm: Any, prompt: list[int], n: int = 64) -> float:
    """Greedy generation tokens/s at batch 1 (prompt processing included), for the export table."""
    t0 = time.perf_counter()
    got = _llama_greedy(llm, prompt, n, set())
    return len(got) / (time.perf_counter() - t0)
