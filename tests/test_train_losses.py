"""sft_loss: hand values, parity with full-logits cross-entropy (softcap, tied head), masking."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from protege.train.losses import IGNORE_INDEX, linear_cross_entropy, sft_loss
from protege.train.sft import SFTModule


def full_logits_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The textbook loss on full (B, T, V) logits with shifted labels: the reference `sft_loss` must match."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def test_uniform_logits_give_log_vocab():
    hidden = torch.zeros(1, 3, 4)
    weight = torch.randn(10, 4)
    labels = torch.tensor([[IGNORE_INDEX, 2, 7]])
    assert float(sft_loss(hidden, weight, labels)) == pytest.approx(math.log(10), rel=1e-6)


def test_hand_computed_two_tokens():
    # W = I, so the logits are the hidden states: [1, 0] -> target 0 costs log(1 + e^-1); [0, 2] -> log(1 + e^2)
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    weight = torch.eye(2)
    labels = torch.tensor([[0, 0]])
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2
    assert float(sft_loss(hidden, weight, labels)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_chunked_loss_and_grads_match_full_logits(softcap, chunk):
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 37, (2, 9))
    labels[0, :4] = IGNORE_INDEX
    labels[1, -1] = IGNORE_INDEX
    ours = sft_loss(hidden, weight, labels, softcap=softcap, chunk_size=chunk)
    g_ours = torch.autograd.grad(ours, [hidden, weight])
    logits = hidden @ weight.t()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    ref = full_logits_cross_entropy(logits, labels)
    g_ref = torch.autograd.grad(ref, [hidden, weight])
    assert ours.item() == pytest.approx(ref.item(), abs=1e-10)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_unlabelled_positions_do_not_matter():
    """Hand-built mask: hidden states at positions without a label change neither loss nor get gradient."""
    torch.manual_seed(1)
    hidden = torch.randn(1, 6, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX, 5]])
    loss = sft_loss(hidden, weight, labels)
    (grad,) = torch.autograd.grad(loss, [hidden])
    assert grad[0, [0, 1, 4]].abs().sum() == 0
    assert grad[0, [2, 3, 5]].abs().sum() > 0
    other = hidden.detach().clone()
    other[0, [0, 1, 4]] = torch.randn(3, 8) * 100
    assert float(sft_loss(other, weight, labels)) == pytest.approx(float(loss), rel=1e-6)


def test_normalizer_and_empty_batch():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    labels = torch.tensor([[1, 2, IGNORE_INDEX, 3]])
    assert float(sft_loss(hidden, weight, labels, normalizer=1.0)) == pytest.approx(
        3 * float(sft_loss(hidden, weight, labels)), rel=1e-5)
    empty = sft_loss(hidden, weight, torch.full((1, 4), IGNORE_INDEX))
    assert float(empty) == 0.0
    empty.backward()  # still differentiable: DDP needs every rank to run backward
    assert linear_cross_entropy(torch.zeros(0, 8), weight, torch.zeros(0, dtype=torch.long)).item() == 0.0


@pytest.mark.parametrize("arch", ["llama", "gemma", "gemma-softcap"])
def test_module_loss_equals_model_full_logits(arch, tiny_llama, tiny_gemma):
    model = copy.deepcopy(tiny_llama[0] if arch == "llama" else tiny_gemma[0])
    if arch == "gemma-softcap":
        model.config.final_logit_softcapping = 2.0
    torch.manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (2, 12))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    labels[0, :5] = IGNORE_INDEX
    pos = torch.arange(12).expand(2, -1)
    ours = SFTModule(model)(ids, pos, labels)
    ref = full_logits_cross_entropy(model(input_ids=ids).logits, labels)
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)


def test_per_token_weights_match_weighted_reference():
    torch.manual_seed(2)
    hidden = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 30, (7,))
    w = torch.rand(7, dtype=torch.float64)
    ours = linear_cross_entropy(hidden, weight, targets, w, chunk_size=3)
    ref = (torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="none") * w).sum()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    for a, b in zip(torch.autograd.grad(ours, [hidden, weight]), torch.autograd.grad(ref, [hidden, weight])):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_row_override_matches_merged_head(softcap):
    """Trainable token rows on a frozen head: same loss and gradients as the merged (V, H) head."""
    torch.manual_seed(3)
    hidden = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    base = torch.randn(29, 8, dtype=torch.float64)
    ids = torch.tensor([3, 17, 28])
    rows = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 29, (2, 7))
    labels[0, 1] = 17  # a target among the overridden rows
    labels[1, :2] = IGNORE_INDEX
    ours = sft_loss(hidden, base, labels, softcap=softcap, chunk_size=4, row_override=(ids, rows))
    g_ours = torch.autograd.grad(ours, [hidden, rows])
    merged = base.index_copy(0, ids, rows)
    ref = sft_loss(hidden, merged, labels, softcap=softcap, chunk_size=1000)
    g_ref = torch.autograd.grad(ref, [hidden, rows])
    assert ours.item() == pytest.approx(ref.item(), abs=1e-10)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    assert g_ours[1].abs().sum() > 0
