"""The cosine loss family: hand-computed cases, parity with PyTorch and Keras, gradients and properties."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from exprae.losses import (
    CosineLoss,
    MixedLoss,
    MSELoss,
    OnlinePairCosineLoss,
    OnlineTripletCosineLoss,
    PairCosineLoss,
    TripletCosineLoss,
    cosine_similarity,
    cosine_similarity_matrix,
)
from exprae.train import CONFIG_DIR

REDUCTIONS = ("mean", "sum", "none")
SQRT_HALF = math.sqrt(0.5)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ hand-computed tiny cases

# Four 2-D embeddings at 0°, 45°, 90° and 180°; cosines 0°·45° = 45°·90° = √½, 0°·90° = 90°·180° = 0, ...
Z_TINY = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
LABELS_TINY = torch.tensor([0, 0, 1, 1])


def test_cosine_and_mixed_losses_by_hand():
    pred = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 2.0], [3.0, 3.0], [1.0, 1.0]])  # orthogonal, parallel, zero prediction
    w = torch.tensor([1.0, 2.0, 1.0])
    cos_loss = [1.0, 0.0, 1.0]  # a zero vector has cosine 0
    mse = [(1 + 4) / 2, (4 + 4) / 2, (1 + 1) / 2]
    expected = {
        "none": cos_loss,
        "sum": sum(cos_loss),
        "mean": sum(cos_loss) / 3,
    }
    for reduction, value in expected.items():
        out = CosineLoss(reduction=reduction)(pred, target)
        assert out.tolist() == pytest.approx(value, abs=1e-6), reduction
    # Weights: "none" is w_n l_n, "sum" is sum w_n l_n, "mean" is the weighted mean sum w_n l_n / sum w_n.
    assert CosineLoss(reduction="none")(pred, target, w).tolist() == pytest.approx([1.0, 0.0, 1.0], abs=1e-6)
    assert CosineLoss(reduction="sum")(pred, target, w).item() == pytest.approx(2.0, abs=1e-6)
    assert CosineLoss(reduction="mean")(pred, target, w).item() == pytest.approx(2.0 / 4.0, abs=1e-6)
    mixed = [0.25 * m + 0.75 * c for m, c in zip(mse, cos_loss, strict=True)]
    assert MixedLoss(0.25, reduction="none")(pred, target).tolist() == pytest.approx(mixed, abs=1e-6)
    weighted = sum(wi * li for wi, li in zip(w.tolist(), mixed, strict=True)) / 4.0
    assert MixedLoss(0.25)(pred, target, w).item() == pytest.approx(weighted, abs=1e-6)
    assert MSELoss(reduction="sum")(pred, target, w).item() == pytest.approx(2.5 + 8.0 + 1.0)


def test_centered_cosine_is_one_minus_pearson_by_hand():
    pred = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    target = torch.tensor([[12.0, 14.0, 16.0], [3.0, 2.0, 1.0], [1.0, 2.0, 4.0]])
    # r = 1 (an offset and scale do not matter), r = −1, and a constant profile (no variance) counts as r = 0.
    out = CosineLoss(centered=True, reduction="none")(pred, target)
    assert out.tolist() == pytest.approx([0.0, 2.0, 1.0], abs=1e-6)
    # A constant row whose mean does not round exactly still counts as constant, not as rounding noise.
    # (Plain centering leaves residuals of ~1e-9 here, and two such rows had r = 0.23.)
    flat = torch.full((3, 6), 0.01) * torch.tensor([[1.0], [3.0], [7.0]])
    other = torch.cat([torch.full((1, 6), 0.3), torch.randn(2, 6, generator=_gen())])
    assert CosineLoss(centered=True, reduction="none")(flat, other).tolist() == [1.0, 1.0, 1.0]
    # Uncentered, the offset makes the first pair look similar but not identical.
    assert 0 < CosineLoss(reduction="none")(pred, target)[0].item() < 0.05


def test_dim_selects_the_feature_axis():
    a, b = torch.randn(5, 7, generator=_gen()), torch.randn(5, 7, generator=_gen(1))
    torch.testing.assert_close(CosineLoss(dim=0, reduction="none")(a, b), CosineLoss(reduction="none")(a.T, b.T))
    x3, y3 = torch.randn(4, 6, 3, generator=_gen(2)), torch.randn(4, 6, 3, generator=_gen(3))
    torch.testing.assert_close(cosine_similarity(x3, y3, dim=1), F.cosine_similarity(x3, y3, dim=1))
    torch.testing.assert_close(
        cosine_similarity_matrix(a, dim=0), F.cosine_similarity(a.T[:, None], a.T[None], dim=-1), atol=1e-6, rtol=0
    )


def test_pair_cosine_loss_by_hand():
    x1 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [2.0, 0.0]])
    x2 = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([1, -1, -1, -1])
    loss = PairCosineLoss(margin=-0.5, reduction="none")
    # cos = √½, 0, 0 (zero vector), 1  ->  1 − √½, max(0, 0 + ½), max(0, 0 + ½), max(0, 1 + ½)
    per_pair = [1 - SQRT_HALF, 0.5, 0.5, 1.5]
    assert loss(x1, x2, y).tolist() == pytest.approx(per_pair, abs=1e-6)
    w = torch.tensor([1.0, 2.0, 0.0, 1.0])
    assert PairCosineLoss(margin=-0.5, reduction="sum")(x1, x2, y).item() == pytest.approx(sum(per_pair), abs=1e-6)
    assert PairCosineLoss(margin=-0.5)(x1, x2, y).item() == pytest.approx(sum(per_pair) / 4, abs=1e-6)
    weighted = (per_pair[0] + 2 * 0.5 + 1.5) / 4.0
    assert PairCosineLoss(margin=-0.5)(x1, x2, y, w).item() == pytest.approx(weighted, abs=1e-6)
    assert PairCosineLoss(margin=0.5)(x1[1:2], x2[1:2], y[1:2]).item() == 0.0  # 0 − ½ < 0


def test_triplet_cosine_loss_by_hand():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    p = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    n = torch.tensor([[0.0, 1.0], [2.0, 0.1], [0.0, 1.0]])
    cos_an1 = 2.0 / math.hypot(2.0, 0.1)
    # cos(a, n) − cos(a, p) + 0.3: 0 − √½ + .3 < 0; cos_an1 − √½ + .3 > 0; zero anchor: 0 − 0 + .3
    per = [0.0, cos_an1 - SQRT_HALF + 0.3, 0.3]
    assert TripletCosineLoss(0.3, reduction="none")(a, p, n).tolist() == pytest.approx(per, abs=1e-6)
    assert TripletCosineLoss(0.3, reduction="sum")(a, p, n).item() == pytest.approx(sum(per), abs=1e-6)
    assert TripletCosineLoss(0.3)(a, p, n).item() == pytest.approx(sum(per) / 3, abs=1e-6)
    w = torch.tensor([5.0, 1.0, 2.0])
    assert TripletCosineLoss(0.3)(a, p, n, w).item() == pytest.approx((per[1] + 2 * per[2]) / 8, abs=1e-6)


def test_online_triplet_batch_all_by_hand():
    # Active triplets (margin .2): anchor 45° with positive 0° and negative 90°: √½ − √½ + .2 = .2;
    # anchor 90° with positive 180° (cos 0): negative 0° gives 0 − 0 + .2, negative 45° gives √½ + .2.
    # Every other triplet is inactive (e.g. anchor 0°: negatives 0 and −1 against a positive at √½).
    loss_n = [0.0, 0.2, 0.2 + SQRT_HALF + 0.2, 0.0]
    loss = OnlineTripletCosineLoss(0.2, mining="all", reduction="none")
    assert loss(Z_TINY, LABELS_TINY).tolist() == pytest.approx(loss_n, abs=1e-9)
    assert loss.per_cell(Z_TINY, LABELS_TINY)[1].tolist() == [0, 1, 2, 0]
    assert OnlineTripletCosineLoss(0.2, reduction="sum")(Z_TINY, LABELS_TINY).item() == pytest.approx(sum(loss_n))
    # "mean" is over the 3 active triplets, not the 8 valid ones.
    assert OnlineTripletCosineLoss(0.2)(Z_TINY, LABELS_TINY).item() == pytest.approx(sum(loss_n) / 3)
    # Weights weigh each triplet by its anchor's weight: (1·.2 + 2·(.6 + √½)) / (1·1 + 2·2).
    w = torch.tensor([1.0, 1.0, 2.0, 1.0], dtype=torch.float64)
    assert OnlineTripletCosineLoss(0.2)(Z_TINY, LABELS_TINY, w).item() == pytest.approx((0.2 + 2 * loss_n[2]) / 5)


def test_online_triplet_batch_hard_by_hand():
    # Per anchor: hardest negative − hardest positive + .2, floored at 0.
    loss_n = [0.0, SQRT_HALF - SQRT_HALF + 0.2, SQRT_HALF - 0.0 + 0.2, 0.0]
    loss = OnlineTripletCosineLoss(0.2, mining="hard", reduction="none")
    assert loss(Z_TINY, LABELS_TINY).tolist() == pytest.approx(loss_n, abs=1e-9)
    assert OnlineTripletCosineLoss(0.2, mining="hard")(Z_TINY, LABELS_TINY).item() == pytest.approx(sum(loss_n) / 4)
    w = torch.tensor([1.0, 1.0, 2.0, 1.0], dtype=torch.float64)
    hard_mean = OnlineTripletCosineLoss(0.2, mining="hard")(Z_TINY, LABELS_TINY, w)
    assert hard_mean.item() == pytest.approx((0.2 + 2 * loss_n[2]) / 5)


def test_online_pair_loss_by_hand():
    # Ordered pairs, margin 0. Cell 0: positive 45° (1 − √½), negatives 90° (0), 180° (max(0, −1) = 0).
    loss_n = [1 - SQRT_HALF, (1 - SQRT_HALF) + SQRT_HALF, 1.0 + SQRT_HALF, 1.0]
    loss = OnlinePairCosineLoss(0.0, reduction="none")
    assert loss(Z_TINY, LABELS_TINY).tolist() == pytest.approx(loss_n, abs=1e-9)
    assert OnlinePairCosineLoss(0.0)(Z_TINY, LABELS_TINY).item() == pytest.approx(sum(loss_n) / 12)


def test_unlabelled_cells_take_part_in_nothing():
    z = torch.cat([Z_TINY, torch.tensor([[0.3, -0.7]], dtype=torch.float64)])
    labels = torch.cat([LABELS_TINY, torch.tensor([-1])])
    for loss in (OnlineTripletCosineLoss(0.2), OnlineTripletCosineLoss(0.2, mining="hard"), OnlinePairCosineLoss()):
        loss_n, count_n = loss.per_cell(z, labels)
        assert loss_n[-1] == 0 and count_n[-1] == 0
        torch.testing.assert_close(loss(z, labels), loss(Z_TINY, LABELS_TINY))


def test_a_batch_without_triplets_gives_zero_not_nan():
    z = torch.randn(6, 3, generator=_gen(), requires_grad=True)
    for labels in (torch.zeros(6, dtype=torch.long), torch.arange(6), torch.full((6,), -1)):
        for loss in (OnlineTripletCosineLoss(), OnlineTripletCosineLoss(mining="hard"), OnlinePairCosineLoss()):
            value = loss(z, labels)
            (1e6 * value).backward()  # a large aux weight must not turn the empty case into inf · 0 = NaN
            assert torch.isfinite(value) and torch.isfinite(z.grad).all()
            if not isinstance(loss, OnlinePairCosineLoss) or (labels < 0).all():
                assert value.item() == 0.0


# ------------------------------------------------------------------ parity with PyTorch


def _pairs(n: int = 64, d: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    x1, x2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    x2[: n // 2] += 2 * x1[: n // 2]  # some similar pairs, so both branches are exercised
    x1[3], x2[5] = 0.0, 0.0  # zero vectors: cos = 0 in both implementations
    y = torch.where(torch.rand(n, generator=g) < 0.5, 1, -1)
    return x1, x2, y


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("margin", [-0.5, 0.0, 0.3])
def test_pair_loss_matches_torch_cosine_embedding_loss(reduction, margin):
    x1, x2, y = _pairs()
    ours = PairCosineLoss(margin, reduction=reduction)(x1, x2, y)
    theirs = nn.CosineEmbeddingLoss(margin=margin, reduction=reduction)(x1, x2, y.float())
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_pair_loss_matches_torch_on_unbatched_vectors_and_float64():
    x1, x2, y = _pairs()
    x1, x2 = x1.double(), x2.double()
    torch.testing.assert_close(PairCosineLoss(0.1)(x1, x2, y), F.cosine_embedding_loss(x1, x2, y.double(), 0.1))
    one = PairCosineLoss()(x1[0], x2[0], torch.tensor(1))
    torch.testing.assert_close(one, F.cosine_embedding_loss(x1[0], x2[0], torch.tensor(1.0)))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_cosine_loss_matches_torch_cosine_similarity(reduction, dim):
    a, b = torch.randn(40, 25, generator=_gen()), torch.randn(40, 25, generator=_gen(1))
    a[2] = 0.0
    theirs = 1 - F.cosine_similarity(a, b, dim=dim)
    theirs = {"none": theirs, "sum": theirs.sum(), "mean": theirs.mean()}[reduction]
    torch.testing.assert_close(CosineLoss(reduction=reduction, dim=dim)(a, b), theirs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_triplet_loss_matches_torch_triplet_margin_with_cosine_distance(reduction):
    g = _gen()
    a, p, n = (torch.randn(50, 12, generator=g) for _ in range(3))
    p += a  # positives closer than negatives, so some triplets are inactive
    theirs = nn.TripletMarginWithDistanceLoss(
        distance_function=lambda u, v: 1 - F.cosine_similarity(u, v), margin=0.3, reduction=reduction
    )(a, p, n)
    torch.testing.assert_close(TripletCosineLoss(0.3, reduction=reduction)(a, p, n), theirs)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_online_pair_loss_is_cosine_embedding_loss_over_all_ordered_pairs(reduction):
    g = _gen()
    z, labels = torch.randn(20, 6, generator=g), torch.randint(0, 3, (20,), generator=g)
    i, j = (idx.flatten() for idx in torch.meshgrid(torch.arange(20), torch.arange(20), indexing="ij"))
    off_diagonal = i != j
    i, j = i[off_diagonal], j[off_diagonal]
    y = torch.where(labels[i] == labels[j], 1.0, -1.0)
    theirs = F.cosine_embedding_loss(z[i], z[j], y, margin=0.2, reduction=reduction)
    torch.testing.assert_close(OnlinePairCosineLoss(0.2, reduction=reduction)(z, labels), theirs)


def _brute_force_triplets(z: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """The (anchor, positive, negative) loss tensor, zero where the triplet is not valid."""
    s = F.cosine_similarity(z[:, None], z[None], dim=-1)
    lab = labels >= 0
    same = labels[:, None] == labels[None]
    pos = same & lab[:, None] & lab[None] & ~torch.eye(len(z), dtype=torch.bool)
    neg = ~same & lab[:, None] & lab[None]
    return (s[:, None, :] - s[:, :, None] + margin).clamp_min(0) * pos[:, :, None] * neg[:, None, :]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_all_and_batch_hard_match_brute_force(seed):
    g = _gen(seed)
    z = torch.randn(33, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(-1, 4, (33,), generator=g)
    t_apn = _brute_force_triplets(z, labels, 0.25)
    loss_n, count_n = OnlineTripletCosineLoss(0.25, mining="all").per_cell(z, labels)
    torch.testing.assert_close(loss_n, t_apn.sum(dim=(1, 2)))
    torch.testing.assert_close(count_n, (t_apn > 0).sum(dim=(1, 2)).double())
    torch.testing.assert_close(OnlineTripletCosineLoss(0.25)(z, labels), t_apn.sum() / (t_apn > 0).sum())
    # Batch-hard: for each anchor, the largest triplet loss is the one with its hardest positive and negative.
    hard_n, valid_n = OnlineTripletCosineLoss(0.25, mining="hard").per_cell(z, labels)
    torch.testing.assert_close(hard_n, t_apn.flatten(1).amax(dim=1))
    n_pos = torch.stack([((labels == y) & (y >= 0)).sum() - 1 for y in labels])
    n_neg = torch.stack([((labels != y) & (labels >= 0) & (y >= 0)).sum() for y in labels])
    assert valid_n.tolist() == ((n_pos > 0) & (n_neg > 0)).double().tolist()


def test_batch_all_in_float32_matches_float64_on_a_large_batch():
    g = _gen()
    z, labels = torch.randn(512, 16, generator=g, dtype=torch.float64), torch.randint(0, 8, (512,), generator=g)
    loss = OnlineTripletCosineLoss(0.2)
    torch.testing.assert_close(loss(z.float(), labels).double(), loss(z, labels), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the Keras conventions the docs state


def _keras_cosine_similarity(y_true, y_pred, sample_weight=None, reduction="sum_over_batch_size", axis=-1):
    """keras.losses.CosineSimilarity as documented and implemented in Keras 3 (``keras/src/losses``), in numpy.

    Per sample: ``-sum(normalize(y_true) * normalize(y_pred))`` with ``normalize(x) = x / max(||x||, 1e-7)``;
    then ``values * sample_weight`` and ``sum`` / divide by the number of samples / by ``sum(sample_weight)``.
    """
    t, p = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-7)  # noqa: E731
    values = -(unit(t) * unit(p)).sum(axis=axis)
    if sample_weight is not None:
        values = values * np.asarray(sample_weight, np.float64)
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if reduction == "mean_with_sample_weight" and sample_weight is not None:
        return values.sum() / np.sum(sample_weight)
    return values.sum() / values.size  # "sum_over_batch_size" and "mean"


def test_keras_reference_reproduces_the_keras_documentation_example():
    y_true, y_pred = [[0.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]]
    assert _keras_cosine_similarity(y_true, y_pred, axis=1) == pytest.approx(-0.5)
    assert _keras_cosine_similarity(y_true, y_pred, [0.8, 0.2], axis=1) == pytest.approx(-0.0999, abs=1e-4)
    assert _keras_cosine_similarity(y_true, y_pred, reduction="sum", axis=1) == pytest.approx(-0.999, abs=1e-3)
    assert _keras_cosine_similarity(y_true, y_pred, reduction="none", axis=1) == pytest.approx([0.0, -1.0])


def test_cosine_loss_converts_to_keras_as_documented():
    g = _gen()
    y_true, y_pred = torch.randn(30, 8, generator=g, dtype=torch.float64), torch.randn(30, 8, generator=g).double()
    y_true[4] = 0.0
    w = torch.rand(30, generator=g, dtype=torch.float64) * 3
    n, w_sum = 30, w.sum().item()

    def ours(reduction, weight=None):
        return CosineLoss(reduction=reduction)(y_pred, y_true, weight).numpy()

    def keras(reduction, weight=None):
        return _keras_cosine_similarity(y_true, y_pred, None if weight is None else w.numpy(), reduction)

    # Keras returns −cos, exprae 1 − cos: the same gradients, values offset by 1 per (weighted) cell.
    assert keras("sum_over_batch_size") == pytest.approx(ours("mean") - 1)
    assert keras("mean_with_sample_weight", w) == pytest.approx(ours("mean", w) - 1)
    # Keras' default with sample weights divides by the batch size, not by the sum of the weights.
    assert keras("sum_over_batch_size", w) == pytest.approx((ours("sum", w) - w_sum) / n)
    assert keras("sum", w) == pytest.approx(ours("sum", w) - w_sum)
    np.testing.assert_allclose(keras("none", w), ours("none", w) - w.numpy())


# ------------------------------------------------------------------ gradients, dtypes, refusals


def _f64(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).requires_grad_()


@pytest.mark.parametrize(
    "loss",
    [CosineLoss(), CosineLoss(centered=True, reduction="sum"), MixedLoss(0.3), MSELoss(reduction="sum")],
    ids=["cosine", "pearson", "mixed", "mse"],
)
def test_reconstruction_gradients(loss):
    pred, target, w = _f64(6, 9), _f64(6, 9, seed=1), torch.rand(6, dtype=torch.float64, generator=_gen(2))
    assert torch.autograd.gradcheck(lambda p, t: loss(p, t, w), (pred, target))


def test_pair_and_triplet_gradients():
    x1, x2, a, p, n = (_f64(7, 5, seed=s) for s in range(5))
    y = torch.tensor([1, -1, 1, -1, -1, 1, -1])
    w = torch.rand(7, dtype=torch.float64, generator=_gen(9))
    assert torch.autograd.gradcheck(lambda u, v: PairCosineLoss(-0.2)(u, v, y, w), (x1, x2))
    assert torch.autograd.gradcheck(lambda u, v, q: TripletCosineLoss(0.5)(u, v, q, w), (a, p, n))


@pytest.mark.parametrize(
    "loss",
    [OnlineTripletCosineLoss(0.3), OnlineTripletCosineLoss(0.3, mining="hard"), OnlinePairCosineLoss(0.1)],
    ids=["batch_all", "batch_hard", "pairs"],
)
def test_online_loss_gradients(loss):
    z, labels = _f64(14, 4), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2, -1, 0, 1, 2])
    w = torch.rand(14, dtype=torch.float64, generator=_gen(3))
    assert torch.autograd.gradcheck(lambda t: loss(t, labels, w), (z,))


ALL_LOSSES = {
    "cosine": lambda a, b, c, lab: CosineLoss()(a, b),
    "pearson": lambda a, b, c, lab: CosineLoss(centered=True)(a, b),
    "mixed": lambda a, b, c, lab: MixedLoss(0.5)(a, b),
    "pair": lambda a, b, c, lab: PairCosineLoss(0.1)(a, b, torch.where(lab % 2 == 0, 1, -1)),
    "triplet": lambda a, b, c, lab: TripletCosineLoss(0.2)(a, b, c),
    "batch_all": lambda a, b, c, lab: OnlineTripletCosineLoss(0.2)(a, lab),
    "batch_hard": lambda a, b, c, lab: OnlineTripletCosineLoss(0.2, mining="hard")(a, lab),
    "pairs": lambda a, b, c, lab: OnlinePairCosineLoss(0.1)(a, lab),
}


@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_zero_rows_give_finite_losses_and_gradients(name):
    a, b, c = (torch.randn(8, 6, generator=_gen(s)) for s in range(3))
    a[[0, 3]], b[[0, 5]], c[1] = 0.0, 0.0, 0.0
    a.requires_grad_()
    value = ALL_LOSSES[name](a, b, c, torch.tensor([0, 0, 1, 1, 2, 2, 0, 1]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(a.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_half_precision_inputs_are_computed_in_float32(name, dtype):
    a, b, c = (torch.randn(16, 40, generator=_gen(s)).to(dtype) for s in range(3))
    labels = torch.arange(16) % 3
    low = ALL_LOSSES[name](a, b, c, labels)
    ref = ALL_LOSSES[name](a.float(), b.float(), c.float(), labels)  # the same rounded inputs, in float32
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref)


def test_cosine_matrix_stays_float32_under_bf16_autocast():
    z = torch.randn(64, 32, generator=_gen())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = cosine_similarity_matrix(z)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s.double(), cosine_similarity_matrix(z.double()), atol=1e-6, rtol=0)


def test_all_zero_weights_give_zero_loss_and_finite_gradients():
    pred = torch.randn(3, 4, generator=_gen(), requires_grad=True)
    (1e6 * CosineLoss()(pred, torch.randn(3, 4, generator=_gen(1)), torch.zeros(3))).backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_invalid_settings_are_refused():
    z, labels = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="reduction"):
        PairCosineLoss(reduction="batchmean")
    with pytest.raises(ValueError, match="margin"):
        PairCosineLoss(margin=1.5)
    with pytest.raises(ValueError, match="margin"):
        TripletCosineLoss(margin=-0.1)
    with pytest.raises(ValueError, match="mining"):
        OnlineTripletCosineLoss(mining="semi-hard")
    with pytest.raises(ValueError, match="dissimilar pair"):
        PairCosineLoss()(z, z, torch.tensor([1, 0, -1, 1]))
    with pytest.raises(ValueError, match="one value per pair"):
        PairCosineLoss()(z, z, torch.tensor([1, -1]))
    with pytest.raises(ValueError, match="same shape"):
        TripletCosineLoss()(z, z, z[:2])
    with pytest.raises(ValueError, match="integer codes"):
        OnlineTripletCosineLoss()(z, labels.float())
    with pytest.raises(ValueError, match="one integer per cell"):
        OnlinePairCosineLoss()(z, labels[:3])
    with pytest.raises(ValueError, match="one value per cell"):
        OnlineTripletCosineLoss()(z, labels, torch.ones(3))
    with pytest.raises(ValueError, match="2-D"):
        OnlineTripletCosineLoss()(z[None], labels)


# ------------------------------------------------------------------ properties (hypothesis)

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def profile_pairs(draw, max_rows: int = 6, max_cols: int = 8):
    """Two float32 matrices of the same shape, some rows zeroed."""
    n, d = draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols))
    a = torch.from_numpy(draw(arrays(np.float32, (n, d), elements=finite)))
    b = torch.from_numpy(draw(arrays(np.float32, (n, d), elements=finite)))
    zero_a = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    a[zero_a] = 0.0
    return a, b


@settings(max_examples=60, deadline=None)
@given(profile_pairs(), st.integers(0, 3))
def test_every_loss_is_finite_and_bounded(pair, seed):
    a, b = pair
    c = b.flip(0)
    labels = torch.randint(0, 2, (len(a),), generator=_gen(seed))
    cos = cosine_similarity(a, b)
    assert torch.isfinite(cos).all() and (cos.abs() <= 1 + 1e-5).all()
    for name, loss in ALL_LOSSES.items():
        value = loss(a, b, c, labels)
        assert torch.isfinite(value), name
        # 1 − cos lies in [0, 2], a triplet term in [0, 2 + margin]; the mixed loss has an MSE part (unbounded).
        upper = {"mixed": math.inf, "triplet": 2.2, "batch_all": 2.2, "batch_hard": 2.2}.get(name, 2.0) + 1e-5
        assert -1e-6 <= value.item() <= upper, (name, value.item())


@settings(max_examples=60, deadline=None)
@given(profile_pairs(), st.floats(0.01, 100.0))
def test_cosine_is_scale_invariant_per_cell_and_symmetric(pair, scale):
    a, b = pair
    scale_n = torch.linspace(1.0, scale, len(a))[:, None]  # a different positive scale for each cell
    # Rows so small that scaling moves them across eps are the one place the invariance is not exact.
    ok = (a.norm(dim=1) * min(scale, 1.0) > 1e-3) | (a.norm(dim=1) == 0)
    for centered in (False, True):
        loss = CosineLoss(centered=centered, reduction="none")
        torch.testing.assert_close(loss(a * scale_n, b)[ok], loss(a, b)[ok], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(loss(a, b), loss(b, a))
    torch.testing.assert_close(cosine_similarity_matrix(a), cosine_similarity_matrix(a).T)
    y = torch.where(torch.arange(len(a)) % 2 == 0, 1, -1)
    torch.testing.assert_close(
        PairCosineLoss(0.1, reduction="none")(a, b, y), PairCosineLoss(0.1, reduction="none")(b, a, y)
    )


def test_mse_is_not_scale_invariant_but_cosine_is():
    a, b = torch.randn(10, 20, generator=_gen()), torch.randn(10, 20, generator=_gen(1))
    assert not torch.allclose(MSELoss(reduction="none")(3 * a, b), MSELoss(reduction="none")(a, b))
    torch.testing.assert_close(CosineLoss(reduction="none")(3 * a, b), CosineLoss(reduction="none")(a, b))


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(CONFIG_DIR) / "loss").glob("*.yaml")))
def test_every_loss_config_composes_and_instantiates(compose_cfg, name):
    cfg = compose_cfg(f"loss={name}")
    loss = hydra.utils.instantiate(cfg.loss)
    assert isinstance(loss, nn.Module) and loss.reduction in REDUCTIONS


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(CONFIG_DIR) / "aux").glob("*.yaml")))
def test_every_aux_config_composes_and_instantiates(compose_cfg, name):
    cfg = compose_cfg(f"aux={name}", "aux.label_key=bulk_labels")
    assert cfg.data.label_key == "bulk_labels"
    if name == "none":
        assert cfg.aux.loss is None
        return
    loss = hydra.utils.instantiate(cfg.aux.loss)
    z, labels = torch.randn(12, 4, generator=_gen()), torch.arange(12) % 3
    assert torch.isfinite(loss(z, labels)) and cfg.aux.weight > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_cuda_under_bf16_autocast_matches_cpu_float32(name):
    a, b, c = (torch.randn(256, 64, generator=_gen(s)) for s in range(3))
    labels = torch.arange(256) % 7
    ref = ALL_LOSSES[name](a, b, c, labels)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = ALL_LOSSES[name](a.cuda(), b.cuda(), c.cuda(), labels.cuda())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), ref, atol=1e-5, rtol=1e-5)
