"""Integration scores against the formulas of Luecken et al. 2022 (scIB) on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from sklearn.metrics import silhouette_samples

from exprae.scoring.integration import clisi, ilisi, integration_scores, lisi, silhouette_batch, silhouette_label


def test_lisi_with_equidistant_neighbours_is_the_inverse_simpson_of_their_counts():
    # The corners of a simplex: every cell's neighbours are all at the same distance, so every weight is equal
    # whatever β, and LISI = 1 / Σ_b (n_b / k)².
    z = torch.eye(5)
    batch = torch.tensor([0, 0, 0, 1, 1])
    values = lisi(z, batch, k=4, perplexity=2)
    # A cell of batch 0 sees 2 of batch 0 and 2 of batch 1: 1 / (1/4 + 1/4); one of batch 1 sees 3 + 1.
    torch.testing.assert_close(values, torch.tensor([2.0, 2.0, 2.0, 1.6, 1.6]))


def test_lisi_calibrates_the_weights_to_the_perplexity():
    # Cell 0 of three on a line (0, 1, 3) has neighbours at distances 1 and 3; the weights exp(-β d) must have
    # perplexity 1.5. β solved independently with scipy's root finder.
    z = torch.tensor([[0.0], [1.0], [3.0]])
    d = np.array([1.0, 3.0])

    def entropy(beta: float) -> float:
        p = np.exp(-beta * d)
        p /= p.sum()
        return float(-(p * np.log(p)).sum())

    beta = brentq(lambda b: entropy(b) - math.log(1.5), 1e-6, 50)
    p = np.exp(-beta * d) / np.exp(-beta * d).sum()
    values = lisi(z, torch.tensor([0, 1, 2]), k=2, perplexity=1.5)
    assert float(values[0]) == pytest.approx(1 / (p**2).sum(), rel=1e-4)
    # The same weights with the labels of the two neighbours equal: one category, LISI 1.
    assert float(lisi(z, torch.tensor([0, 1, 1]), k=2, perplexity=1.5)[0]) == pytest.approx(1.0)


def test_ilisi_and_clisi_are_scaled_to_zero_and_one():
    gen = torch.Generator().manual_seed(0)
    n = 300
    batch = torch.arange(n) % 2
    label = (torch.arange(n) // 2) % 3
    centres = 20 * torch.randn(3, 5, generator=gen)
    mixed = centres[label] + torch.randn(n, 5, generator=gen)  # batches interleaved within each cell type
    separated = mixed + 100 * batch[:, None].float()  # each batch far away from the other
    assert ilisi(separated, batch) == pytest.approx(0.0, abs=1e-6)
    # Measured 0.93: every neighbourhood holds both batches in nearly equal shares (1.0 exactly would need
    # infinite neighbourhoods); the separated case is 0, an unscaled LISI would be near 2.
    assert ilisi(mixed, batch) > 0.85
    assert clisi(mixed, label) == pytest.approx(1.0, abs=1e-6)
    # Cell types that are not separated at all: each neighbourhood holds about all three.
    assert clisi(torch.randn(n, 5, generator=gen), label) < 0.2  # measured 0.13; separated types give 1.0
    assert math.isnan(ilisi(mixed, torch.zeros(n, dtype=torch.long)))


def test_silhouettes_follow_the_scib_formulas():
    gen = torch.Generator().manual_seed(1)
    n = 120
    label = torch.arange(n) % 2
    batch = (torch.arange(n) // 2) % 2
    z = 10 * label[:, None].float() + torch.randn(n, 3, generator=gen) + 0.5 * batch[:, None].float()
    zn, yn, bn = z.double().numpy(), label.numpy(), batch.numpy()
    assert silhouette_label(z, label) == pytest.approx((silhouette_samples(zn, yn).mean() + 1) / 2, rel=1e-6)
    per_label = [np.mean(1 - np.abs(silhouette_samples(zn[yn == y], bn[yn == y]))) for y in (0, 1)]
    assert silhouette_batch(z, batch, label) == pytest.approx(np.mean(per_label), rel=1e-6)
    # A label seen in one batch only is skipped.
    only_one = batch.clone()
    only_one[label == 1] = 0
    per_label = [np.mean(1 - np.abs(silhouette_samples(zn[yn == 0], bn[yn == 0])))]
    assert silhouette_batch(z, only_one, label) == pytest.approx(per_label[0], rel=1e-6)


def test_integration_scores_skip_unlabelled_cells_and_need_labels_for_biology():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(60, 4, generator=gen)
    batch = torch.arange(60) % 2
    assert set(integration_scores(z, batch)) == {"ilisi"}
    labels = torch.arange(60) % 3
    scores = integration_scores(z, batch, labels)
    assert set(scores) == {"ilisi", "clisi", "silhouette_label", "silhouette_batch"}
    unlabelled = labels.clone()
    unlabelled[:30] = -1
    assert integration_scores(z, batch, unlabelled)["clisi"] == pytest.approx(
        clisi(z[30:], labels[30:], k=29), abs=1e-6
    )
