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


# Written against the survivors of `make mutation MODULES=expression_losses` (docs/testing.md): each test names
# the behaviour a surviving mutant changed.


def test_mixed_loss_defaults_to_equal_weights_and_reaches_both_ends():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    mse, cos = MSELoss(reduction="none")(pred, target), CosineLoss(reduction="none")(pred, target)
    torch.testing.assert_close(MixedLoss(reduction="none")(pred, target), 0.5 * mse + 0.5 * cos)
    # alpha = 0 and 1 are allowed and are exactly the cosine loss and the MSE loss.
    torch.testing.assert_close(MixedLoss(0.0, reduction="none")(pred, target), cos)
    torch.testing.assert_close(MixedLoss(1.0, reduction="none")(pred, target), mse)


def test_mixed_loss_passes_centering_eps_and_axis_to_both_terms():
    g = torch.Generator().manual_seed(2)
    # Small profiles, so eps = 0.5 changes the cosine term; cells along dim 0 in the transposed copy.
    pred, target = 0.1 * torch.randn(6, 5, generator=g), 0.1 * torch.randn(6, 5, generator=g) + 0.05
    mixed = MixedLoss(0.25, centered=True, eps=0.5, reduction="none")
    expected = 0.25 * MSELoss(reduction="none")(pred, target) + 0.75 * CosineLoss(
        centered=True, eps=0.5, reduction="none"
    )(pred, target)
    torch.testing.assert_close(mixed(pred, target), expected)
    assert not torch.allclose(mixed(pred, target), MixedLoss(0.25, eps=0.5, reduction="none")(pred, target))
    assert not torch.allclose(mixed(pred, target), MixedLoss(0.25, centered=True, reduction="none")(pred, target))
    by_column = MixedLoss(0.25, centered=True, eps=0.5, reduction="none", dim=0)
    torch.testing.assert_close(by_column(pred.T.contiguous(), target.T.contiguous()), expected)


def test_eps_only_guards_a_vanishing_norm():
    # Each squared norm is clamped at eps²: the default (1e-16) is far below these profiles' 1e-6, so tiny identical
    # profiles still have cosine 1. A loss built with eps = 1e-2 clamps both norms to 1e-2: cosine 1e-6 / 1e-4.
    tiny = torch.tensor([[1e-3, 0.0]], dtype=torch.float64)
    assert cosine_similarity(tiny, tiny).item() == pytest.approx(1.0)
    assert CosineLoss(eps=1e-2, reduction="none")(tiny, tiny).item() == pytest.approx(1.0 - 1e-2)


def test_centering_zeroes_only_rows_that_are_constant_up_to_rounding():
    # Row 0 is large and varies; row 1 varies by 0.05 steps around 1000 (float32): its centred norm 0.16 is far
    # above the rounding tolerance of its own size (~8e-3), though below one computed from the whole batch.
    a = torch.tensor([[1e6, 0.0, -1e6, 5e5, 0.0], [1000.0, 1000.05, 1000.1, 1000.15, 1000.2]])
    b = torch.tensor([[1.0, 0.0, -1.0, 0.5, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    r = cosine_similarity(a, b, centered=True)
    assert r.tolist() == pytest.approx([1.0, 1.0], abs=1e-3)


def test_weights_do_not_change_the_loss_dtype():
    pred, target = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    weighted = CosineLoss()(pred, target, torch.tensor([3.0, 1.0], dtype=torch.float64))
    assert weighted.dtype == torch.float32


def test_a_row_constant_up_to_rounding_has_zero_correlation_with_anything():
    # 300 seven times, one entry a float32 ulp (3e-5) higher: centring leaves residuals whose direction is noise
    # (r ~ 0.2 against the row below if they are kept). They sit far below the row's own rounding scale
    # (32 eps x its norm, ~3e-3), so the row counts as constant. Next to it, a row that varies keeps its
    # correlation: the check is per row, at each row's own scale.
    row = torch.full((7,), 300.0)
    row[3] = torch.nextafter(row[3], torch.tensor(1e9))
    a = torch.stack([row, torch.arange(7.0)])
    b = torch.stack([torch.arange(7.0) ** 2, torch.arange(7.0)])
    assert (a[0] - a[0].mean()).abs().max() > 0  # the case needs the rounding to be there
    assert cosine_similarity(a, b, centered=True).tolist() == pytest.approx([0.0, 1.0], abs=1e-6)


def test_mixed_loss_default_eps_is_the_cosine_losses():
    tiny = torch.tensor([[1e-3, 0.0]], dtype=torch.float64)
    assert MixedLoss(0.0, reduction="none")(tiny, tiny).item() == pytest.approx(0.0, abs=1e-9)
