"""Next-token log-probabilities of a few candidate tokens: the primitive under log-prob judge verdicts.

A verdict ("A" / "B" / "tie") is one short continuation of the judge's reply prefix ("Verdict:"), so
reading the judge's next-token distribution at that point gives the verdict and its probability from one
forward pass, instead of generating (and then failing to parse) free text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers import PreTrainedTokenizerBase

__all__ = ["option_token_ids", "torch_option_logprobs"]


def option_token_ids(tokenizer: PreTrainedTokenizerBase, prefix: str, options: Sequence[str]) -> list[list[int]]:
    """The tokens of each option as the tokenizer splits `prefix + option` (as generation would produce
    it), falling back to the option on its own where the split merges across the boundary."""
    base = tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
    seqs = []
    for opt in options:
        whole = tokenizer.encode(prefix + opt, add_special_tokens=False)
        if whole[:len(base)] == base and len(whole) > len(base):
            seqs.append(whole[len(base):])
        else:
            seqs.append(tokenizer.encode(opt, add_special_tokens=False))
    if len({tuple(t) for t in seqs}) != len(seqs) or not all(seqs):
        raise ValueError(f"options {list(options)} tokenize to the same or no tokens after {prefix!r}: {seqs}")
    return seqs


def torch_option_logprobs(model: PreTrainedModel, prompts: list[list[int]], options: Sequence[list[int]], pad_id: int = 0,
                          batch_size: int = 8) -> Iterator[tuple[int, list[float]]]:
    """(index, [log P(option tokens | prompt) for each option]) per prompt, batched by length.

    The shared-context scorer (`loglik.iter_sorted`): one left-padded forward per batch with the LM head
    on the last position only (a common prefix, the judge's system prompt, run once per batch); options
    longer than one token add one short forward on the copied cache.
    """
    from .loglik import EncodedQuestion, iter_sorted

    conts = [list(map(int, o)) for o in options]
    questions = [EncodedQuestion(p, conts) for p in prompts]
    for i, row in iter_sorted(model, questions, batch_size=batch_size, pad_id=pad_id):
        yield i, [lp for lp, _ in row]
