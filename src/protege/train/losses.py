"""Training losses as pure functions of tensors: one function per loss, no model inside.

`sft_loss` is the language-modelling loss of supervised fine-tuning, computed only
where there is a label. It never builds the full (B, T, V) logits tensor: Gemma-3's
262K-token LM head makes those 1 GB per 1K tokens and most of the CPU time, while
typically half of the tokens of a chat batch are prompt tokens that carry no label.
Instead the hidden states of labelled positions are gathered and pushed through the
LM head chunk by chunk by `linear_cross_entropy`, which also computes the gradient
during the forward pass (the "fused linear cross-entropy" trick), so a chunk's
logits are freed as soon as it is done.

`reward_loss` and `dpo_loss` take per-sequence quantities (scores, summed log-probs) and
contain no model, as torchtune's `rlhf/loss/dpo.py`: the same function serves LoRA and full
fine-tuning, packed or padded batches, cached or live reference log-probs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "sft_loss", "linear_cross_entropy", "reward_loss",
           "MARGIN_SCHEMES", "margin_values", "dpo_loss"]

IGNORE_INDEX = -100
RowOverride = tuple[torch.Tensor, torch.Tensor]  # (token ids (k,), their head rows (k, H))
_ONES = torch.ones(())  # sentinel "every token weighs 1"; broadcasts where it is used


def _low_precision_chunk(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, at: torch.Tensor,
                         row_ids: torch.Tensor | None, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(token losses (n,) fp32, softmax - onehot (n, V) in the head's dtype) of one chunk, bf16/fp16 head.

    torch's softmax over bf16 logits accumulates in fp32 and rounds only its output: one pass writing
    2 bytes per logit, against six passes over a fp32 copy (cast, max, subtract+exp, sum, divide,
    cast back) in the fp32 path, 66 ms vs 254 ms for 256 x 262,144 logits on an AVX512-BF16 CPU. The
    loss is -log of the rounded p_y: within 2^-9 nats of the exact value, below the rounding the bf16
    logits themselves carry. A p_y that underflows is recomputed exactly from the logits.
    """
    z = h @ weight.t()  # (n_chunk, V) in bf16
    if rows is not None:
        z[:, row_ids] = h @ rows.t().to(h.dtype)  # fp32 trainable rows, bf16 h
    target_logit = z[at, y].float()
    g = torch.softmax(z, dim=-1)  # fp32 inside, bf16 out; z's buffer is freed after this
    p_y = g[at, y].float()
    token_loss = -torch.log(p_y)
    lost = p_y == 0
    if bool(lost.any()):
        zz = h[lost] @ weight.t()
        if rows is not None:
            zz[:, row_ids] = h[lost] @ rows.t().to(h.dtype)
        token_loss[lost] = torch.logsumexp(zz.float(), dim=-1) - target_logit[lost]
    g[at, y] -= 1.0
    return token_loss, g


def _chunk_grads(g: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, row_ids: torch.Tensor | None,
                 fix: torch.Tensor | None, need_h: bool, need_w: bool, need_r: bool, grad_h: torch.Tensor | None,
                 grad_w: torch.Tensor | None, grad_r: torch.Tensor | None, start: int, chunk_size: int,
                 acc: torch.dtype) -> None:
    """Accumulate one chunk's gradients from `g = d loss / d logits` (n, V) in the head's dtype."""
    if need_h:
        gh = g @ weight
        if fix is not None:
            gh += g[:, row_ids] @ fix
        grad_h[start:start + chunk_size] = gh
    if need_w:
        grad_w.addmm_(g.t().to(acc), h.to(acc))
    if need_r:
        grad_r.addmm_(g[:, row_ids].t().to(grad_r.dtype), h.to(grad_r.dtype))


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(softcap(h_i @ W.T), y_i), with both gradients computed in forward, chunk by chunk.

    The gradient of CE wrt the logits is softmax - onehot; with Gemma's final soft-capping
    `c * tanh(z / c)` it is multiplied by the derivative 1 - tanh^2. Storing grad_h (N, H)
    instead of the logits (N, V) is what keeps memory flat.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, softcap, chunk_size, row_ids, rows):  # type: ignore[override]
        n = hidden.shape[0]
        need_w = weight.requires_grad
        need_h = hidden.requires_grad
        need_r = rows is not None and rows.requires_grad
        if rows is not None:
            # W_eff = weight with rows `row_ids` replaced by `rows`; grad_h = g @ W_eff = g @ weight + g[:, ids] @ fix
            fix = (rows - weight[row_ids]).to(weight.dtype)
        grad_r = torch.zeros_like(rows, dtype=torch.promote_types(rows.dtype, torch.float32)) if need_r else None
        acc = torch.promote_types(hidden.dtype, torch.float32)  # softmax in >= float32 even under bf16
        low = weight.dtype in (torch.bfloat16, torch.float16) and hidden.dtype == weight.dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        total = hidden.new_zeros((), dtype=acc)
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size]
            y = targets[start:start + chunk_size]
            at = torch.arange(len(y), device=y.device)
            if low and softcap is None:
                token_loss, g = _low_precision_chunk(h, weight, y, at, row_ids, rows)
                w = weights.to(acc) if weights is _ONES else weights[start:start + chunk_size].to(acc)
                total = total + (token_loss * w).sum()
                if weights is not _ONES:
                    g.mul_(w[:, None].to(g.dtype))
                _chunk_grads(g, h, weight, row_ids, fix if rows is not None else None, need_h, need_w, need_r,
                             grad_h, grad_w, grad_r, start, chunk_size, acc)
                continue
            z = (h @ weight.t()).to(acc)  # (n_chunk, V): the only logits that ever exist
            if rows is not None:
                z[:, row_ids] = (h @ rows.t().to(h.dtype)).to(acc)  # fp32 trainable rows, bf16 h
            if softcap is not None:
                t = torch.tanh(z.div_(softcap))
                z = t * softcap
            # Each pass over a chunk's logits moves ~V*4 bytes per token, so work in place:
            # max, subtract, exp, sum, divide = softmax and log-sum-exp with no extra (n, V) buffer.
            target_logit = z[at, y]
            peak = z.amax(dim=-1)
            probs = z.sub_(peak[:, None]).exp_()
            norm = probs.sum(dim=-1)
            token_loss = peak + norm.log() - target_logit
            w = weights.to(acc) if weights is _ONES else weights[start:start + chunk_size].to(acc)
            total = total + (token_loss * w).sum()
            if need_h or need_w or need_r:
                g = probs.div_(norm[:, None])  # softmax; d CE / d logits = softmax - onehot
                g[at, y] -= 1.0
                if softcap is not None:
                    g.mul_(1.0 - t * t)
                if weights is not _ONES:
                    g.mul_(w[:, None])
                _chunk_grads(g.to(weight.dtype), h, weight, row_ids, fix if rows is not None else None, need_h,
                             need_w, need_r, grad_h, grad_w, grad_r, start, chunk_size, acc)
        ctx.save_for_backward(*(x for x in (grad_h, grad_w, grad_r) if x is not None))
        ctx.need = (need_h, need_w, need_r)
        ctx.weight_dtype = weight.dtype
        ctx.rows_dtype = None if rows is None else rows.dtype  # fp32 master rows over a bf16 head
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        need_h, need_w, need_r = ctx.need
        gh = saved.pop(0) * grad_out.to(ctx.weight_dtype) if need_h else None
        gw = (saved.pop(0) * grad_out).to(ctx.weight_dtype) if need_w else None
        gr = (saved.pop(0) * grad_out).to(ctx.rows_dtype) if need_r else None
        return gh, gw, None, None, None, None, None, gr


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         weights: torch.Tensor | None = None, softcap: float | None = None,
                         chunk_size: int = 256, row_override: RowOverride | None = None) -> torch.Tensor:
    """Weighted sum of cross-entropies of `hidden (N, H) @ weight (V, H).T` against `targets (N,)`.

    Memory holds at most `chunk_size x V` logits at a time. `weights (N,)` scale each token's
    loss (default 1). `softcap` applies Gemma's `final_logit_softcapping`.
    `row_override = (ids (k,), rows (k, H))`: the head is `weight` with rows `ids` replaced by
    `rows` (PEFT trainable tokens on a frozen head); only `rows` gets a gradient, a (k, H) one,
    where building the (V, H) merged weight would cost a copy and a (V, H) gradient per step.
    """
    if weights is None:
        weights = _ONES  # skips a multiply over every chunk's (n, V) gradient
    row_ids, rows = row_override if row_override is not None else (None, None)
    if hidden.shape[0] == 0:
        extra = rows.sum() if rows is not None else 0.0
        return (hidden.sum() + weight.sum() + extra) * 0.0  # keeps the graph (DDP expects every parameter used)
    return _LinearCrossEntropy.apply(hidden, weight, targets, weights, softcap, chunk_size, row_ids, rows)


def sft_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
             normalizer: float | torch.Tensor | None = None, softcap: float | None = None,
             chunk_size: int = 256, row_override: RowOverride | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions, logits computed only there.

    hidden: (B, T, H) final hidden states (after the final norm); labels: (B, T), already
    shifted (labels[b, t] is the token to predict *after* position t) with IGNORE_INDEX on
    positions without a label (prompt tokens, padding, conversation ends). `normalizer` is
    the number of labelled tokens the mean is over (default: those in this batch); pass the
    count of the whole optimizer step so gradient accumulation and data-parallel ranks give
    exactly the token-weighted mean of one big batch. `row_override`: see `linear_cross_entropy`.
    """
    flat = labels.reshape(-1)
    keep = (flat != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)  # (N_labelled, H)
    total = linear_cross_entropy(h, lm_head_weight, flat.index_select(0, keep), softcap=softcap,
                                 chunk_size=chunk_size, row_override=row_override)
    if normalizer is None:
        normalizer = max(int(keep.numel()), 1)
    return total / normalizer


# LLaMA-2 (Touvron et al. 2023, Table 27): a margin per preference rating, "significantly better" (3),
# "better" (2), "slightly better" (1), "negligibly better / unsure" (0). The small set helped most.
MARGIN_SCHEMES: dict[str, tuple[float, float, float, float]] = {
    "llama2-small": (0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0),
    "llama2-large": (0.0, 1.0, 2.0, 3.0),
}


def margin_values(margins: torch.Tensor, scheme: str, thresholds: tuple[float, float, float] = (0.5, 1.5, 2.5)) -> torch.Tensor:
    """Per-pair margin m for `reward_loss` from the records' margins (B,) (NaN = no margin given).

    "none": m = 0; "raw": the record's margin itself; "llama2-small" / "llama2-large": the margin
    is bucketed into LLaMA-2's four rating levels by `thresholds` (level = how many it reaches)
    and mapped to that scheme's value. Pairs without a margin get m = 0 in every scheme.
    """
    known = ~torch.isnan(margins)
    if scheme == "none":
        return torch.zeros_like(margins)
    if scheme == "raw":
        return torch.where(known, margins, torch.zeros_like(margins))
    if scheme not in MARGIN_SCHEMES:
        raise ValueError(f"unknown margin scheme {scheme!r}; expected none, raw or {', '.join(MARGIN_SCHEMES)}")
    level = sum((margins >= t).long() for t in thresholds)  # 0..3; NaN compares False -> level 0
    values = torch.tensor(MARGIN_SCHEMES[scheme], dtype=margins.dtype, device=margins.device)
    return torch.where(known, values[level], torch.zeros_like(margins))


def reward_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | None = None,
                center_coef: float = 0.0) -> torch.Tensor:
    """Per-pair Bradley-Terry ranking loss of a reward model, (B,) -> (B,).

    -log sigmoid(r_chosen - r_rejected - m) (InstructGPT; the margin m is LLaMA-2's), plus
    `center_coef * (r_chosen + r_rejected)^2`, the reward-centring term of Eisenstein et al.
    (2023) as TRL's `center_rewards_coefficient`, which pins the free offset of the scores.
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_coef:
        loss = loss + center_coef * (chosen_scores + rejected_scores) ** 2
    return loss


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023) from per-sequence *summed* response log-probs, each (B,).

    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), the implicit rewards
    beta * (log pi - log pi_ref) detached for logging. `label_smoothing` > 0 is conservative
    DPO (cDPO: the label is flipped with that probability), as TRL's sigmoid loss.
    """
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    losses = (-F.logsigmoid(beta * logits) * (1.0 - label_smoothing)
              - F.logsigmoid(-beta * logits) * label_smoothing)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards
