"""The core reconstruction losses against hand-computed values and PyTorch's own cosine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from exprae.losses import CosineLoss, MixedLoss, MSELoss, cosine_similarity


def test_hand_computed_values():
    pred = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    target = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    # cell 0: orthogonal, cos 0, mse (1 + 1) / 2 = 1; cell 1: parallel, cos 1, mse (1 + 1) / 2 = 1
    assert CosineLoss(reduction="none")(pred, target).tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    assert MSELoss(reduction="none")(pred, target).tolist() == pytest.approx([1.0, 1.0])
    assert MixedLoss(0.25)(pred, target).item() == pytest.approx(0.25 * 1.0 + 0.75 * 0.5)
    assert CosineLoss(reduction="sum")(pred, target).item() == pytest.approx(1.0, abs=1e-6)


def test_weights_make_a_weighted_mean():
    pred, target = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    w = torch.tensor([3.0, 1.0])
    assert CosineLoss()(pred, target, w).item() == pytest.approx((3 * 1.0 + 1 * 0.0) / 4)
    assert CosineLoss(reduction="sum")(pred, target, w).item() == pytest.approx(3.0)


def test_cosine_matches_torch_on_random_profiles():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 200, generator=g), torch.randn(64, 200, generator=g)
    torch.testing.assert_close(cosine_similarity(a, b), F.cosine_similarity(a, b, dim=-1))
    torch.testing.assert_close(CosineLoss(reduction="none")(a, b), 1 - F.cosine_similarity(a, b, dim=-1))
    centered = cosine_similarity(a, b, centered=True)
    pearson = torch.stack([torch.corrcoef(torch.stack([x, y]))[0, 1] for x, y in zip(a, b, strict=True)])
    torch.testing.assert_close(centered, pearson, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss", [CosineLoss(), CosineLoss(centered=True), MixedLoss(0.5), MSELoss()])
def test_zero_profiles_give_finite_loss_and_gradients(loss):
    pred = torch.zeros(3, 10, requires_grad=True)
    target = torch.zeros(3, 10)
    target[0, 0] = 1.0  # one non-zero target next to all-zero ones
    value = loss(pred, target)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(pred.grad).all()


def test_bf16_inputs_are_computed_in_float32():
    a = torch.randn(8, 50).bfloat16()
    out = CosineLoss(reduction="none")(a, a)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.zeros(8), atol=1e-6, rtol=0)


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="alpha must lie in"):
        MixedLoss(1.5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        MSELoss(reduction="avg")
    with pytest.raises(ValueError, match="differ in shape"):
        MSELoss()(torch.zeros(2, 3), torch.zeros(2, 4))
