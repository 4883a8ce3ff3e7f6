"""Log-probabilities of given tokens, the primitive under RM, DPO, RS and PPO/GRPO.

`token_logprobs(hidden (N, H), W (V, H), targets (N,))` returns log softmax(h W^T)[target]
for N scored positions without ever holding more than `chunk_size x V` logits. Unlike SFT,
whose loss gradient is known in the forward pass (softmax - onehot, fused there), a
preference or RL loss needs the log-probs first and only then says how much each one
matters (d loss / d logp), so the backward pass *recomputes* each chunk's logits:

    d logp_i / d z_i = onehot(y_i) - softmax(z_i);   grad_h_i = g_i (onehot - p_i) W_eff

One extra head matmul per chunk buys memory that stays flat in the number of scored
tokens: gemma-3-270m's 262K-vocabulary head would need 1 GB of logits per 1K tokens, and
TRL's DPO keeps (2B, T, V) of them (prompt positions included) for the whole step.
`sequence_logprobs` sums the scored tokens of each sequence of a packed batch.
"""

from __future__ import annotations

import torch

from ..lm_head import RowOverride
from .losses import IGNORE_INDEX

__all__ = ["token_logprobs", "sequence_logprobs"]


def _logits(h: torch.Tensor, weight: torch.Tensor, row_ids, rows, softcap, acc) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(softcapped logits (n, V) in `acc` precision, tanh(z / c) for the softcap derivative or None)."""
    z = (h @ weight.t()).to(acc)
    if rows is not None:
        z[:, row_ids] = (h @ rows.t().to(h.dtype)).to(acc)  # fp32 trainable rows, bf16 h
    if softcap is None:
        return z, None
    t = torch.tanh(z.div_(softcap))
    return t * softcap, t


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_size, row_ids, rows):  # type: ignore[override]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # log-softmax in >= float32 even under bf16
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        with torch.no_grad():
            for s in range(0, hidden.shape[0], chunk_size):
                z, _ = _logits(hidden[s:s + chunk_size], weight, row_ids, rows, softcap, acc)
                y = targets[s:s + chunk_size]
                out[s:s + chunk_size] = z.gather(1, y[:, None])[:, 0] - torch.logsumexp(z, dim=-1)
        ctx.save_for_backward(hidden, weight, targets, *(() if rows is None else (row_ids, rows)))
        ctx.softcap, ctx.chunk_size, ctx.has_rows = softcap, chunk_size, rows is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, targets, *extra = ctx.saved_tensors
        row_ids, rows = extra if ctx.has_rows else (None, None)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_r = ctx.has_rows and ctx.needs_input_grad[6]
        acc = torch.promote_types(hidden.dtype, torch.float32)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_r = torch.zeros_like(rows, dtype=acc) if need_r else None
        if rows is not None:
            fix = (rows - weight[row_ids]).to(weight.dtype)  # W_eff = W with rows `row_ids` replaced
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            h, y = hidden[s:s + ctx.chunk_size], targets[s:s + ctx.chunk_size]
            go = grad_out[s:s + ctx.chunk_size].to(acc)
            z, t = _logits(h, weight, row_ids, rows, ctx.softcap, acc)
            g = torch.softmax(z, dim=-1).mul_(-go[:, None])  # (n, V): go * (onehot - softmax)
            g[torch.arange(len(y), device=y.device), y] += go
            if t is not None:
                g.mul_(1.0 - t * t)  # d (c tanh(z / c)) / dz
            g = g.to(weight.dtype)
            if need_h:
                gh = g @ weight
                if rows is not None:
                    gh += g[:, row_ids] @ fix
                grad_h[s:s + ctx.chunk_size] = gh
            if need_w:
                grad_w.addmm_(g.t().to(acc), h.to(acc))
            if need_r:
                grad_r.addmm_(g[:, row_ids].t().to(acc), h.to(acc))
        if grad_w is not None and rows is not None:
            grad_w[row_ids] = 0.0  # those rows of `weight` are replaced by `rows`: they do not reach the logits
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None,
                None if grad_r is None else grad_r.to(rows.dtype))


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None = None,
                   chunk_size: int = 256, row_override: RowOverride | None = None) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) for `hidden (N, H)`, head `weight (V, H)`, `targets (N,)` -> (N,) float32.

    `softcap`: Gemma's final_logit_softcapping. `row_override = (ids, rows)`: the head's rows
    `ids` replaced by trainable `rows` (PEFT trainable tokens), which get a (k, H) gradient.
    """
    row_ids, rows = row_override if row_override is not None else (None, None)
    if hidden.shape[0] == 0:  # keep the graph: DDP expects every parameter used
        extra = rows.sum() * 0.0 if rows is not None else 0.0
        return hidden.sum(-1) * 0.0 + weight.sum() * 0.0 + extra
    return _TokenLogprobs.apply(hidden, weight, targets, softcap, chunk_size, row_ids, rows)


def sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, seq_ids: torch.Tensor,
                      n_seqs: int, softcap: float | None = None, chunk_size: int = 256,
                      row_override: RowOverride | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each sequence's labelled tokens in a (packed) batch.

    hidden: (B, T, H) final hidden states; labels: (B, T) shifted targets (IGNORE_INDEX where
    nothing is scored); seq_ids: (B, T) which of the `n_seqs` sequences a position belongs to
    (-1 on padding). Returns (sum of log-probs (n_seqs,), scored tokens (n_seqs,)); the LM
    head runs only on the scored positions.
    """
    flat = labels.reshape(-1)
    keep = (flat != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)  # (N_scored, H)
    lp = token_logprobs(h, weight, flat.index_select(0, keep), softcap, chunk_size, row_override)
    owner = seq_ids.reshape(-1).index_select(0, keep)
    sums = lp.new_zeros(n_seqs).index_add(0, owner, lp)
    counts = torch.zeros(n_seqs, dtype=torch.long, device=lp.device).index_add_(0, owner, torch.ones_like(owner))
    return sums, counts
