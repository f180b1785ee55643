"""Equivalent PCA components: the PCA-k score curve in closed form, its crossing, and distance moved."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exprae.nn.baselines import Baselines
from exprae.scoring.metrics import per_cell_metrics
from exprae.scoring.pca_gain import equivalent_components, pca_score_curve, relative_weight_change


def test_pca_score_curve_matches_explicit_reconstructions(pbmc):
    x = torch.as_tensor(pbmc.X[:, :200], dtype=torch.float32)  # 200 genes: quick eigendecompositions
    train, held = x[:500], x[500:]
    target = held + 0.3 * torch.randn(held.shape, generator=torch.Generator().manual_seed(0))  # a target != input
    curve = pca_score_curve(
        torch.split(train, 128), zip(torch.split(held, 64), torch.split(target, 64), strict=True), max_components=20
    )
    assert all(len(v) == 21 for v in curve.values())
    for k in (1, 7, 20):
        base = Baselines(x.shape[1], k).fit([train])
        ref = per_cell_metrics(base.pca(held).double(), target.double())
        for name in ("cosine", "pearson", "mse"):
            np.testing.assert_allclose(curve[name][k], ref[name].mean().item(), rtol=1e-4, atol=1e-5)
    ref0 = per_cell_metrics(train.mean(0).expand_as(held).double(), target.double())
    np.testing.assert_allclose(curve["cosine"][0], ref0["cosine"].mean().item(), atol=1e-5)


def test_equivalent_components_interpolates_the_first_crossing():
    curve = np.array([0.0, 0.2, 0.3, 0.35, 0.34, 0.4])
    assert equivalent_components(curve, 0.25) == pytest.approx(1.5)
    assert equivalent_components(curve, 0.3) == pytest.approx(2.0)
    assert equivalent_components(curve, 0.37) == pytest.approx(4 + 0.03 / 0.06)  # the dip is passed over
    assert equivalent_components(curve, 0.5) is None
    assert equivalent_components(curve, -1.0) == 0.0
    mse = np.array([1.0, 0.8, 0.7])
    assert equivalent_components(mse, 0.75, higher_is_better=False) == pytest.approx(1.5)


def test_relative_weight_change():
    start = {"w": torch.tensor([3.0, 4.0]), "steps": torch.tensor(7)}
    assert relative_weight_change(start, {"w": torch.tensor([3.0, 4.0]), "steps": torch.tensor(9)}) == 0.0
    assert relative_weight_change(start, {"w": torch.tensor([6.0, 8.0])}) == pytest.approx(1.0)
