"""Aggregated metrics checked against independent implementations (numpy, scipy, scikit-learn)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from sklearn.neighbors import NearestNeighbors

import exprae
from exprae.runs import rundir
from exprae.scoring.metrics import ReconstructionMetrics
from exprae.train import train


def _cosines(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    return (pred * target).sum(1) / (np.linalg.norm(pred, axis=1) * np.linalg.norm(target, axis=1))


def test_cosine_quantiles_are_numpys_over_every_cell_of_every_batch():
    """101 cells in uneven batches: the median is one cell's value (odd n), the p10 numpy's linear percentile."""
    rng = np.random.default_rng(0)
    target = rng.normal(size=(101, 20))
    # Per-cell noise levels from 0.1 to 3, so the cosines spread over (0, 1) and the quantiles are far apart.
    pred = target + rng.normal(size=(101, 20)) * np.linspace(0.1, 3.0, 101)[:, None]
    metric = ReconstructionMetrics()
    for rows in np.split(rng.permutation(101), [17, 50, 51]):
        metric.update(torch.from_numpy(pred[rows]).float(), torch.from_numpy(target[rows]).float())
    got = {k: float(v) for k, v in metric.compute().items()}
    cos = _cosines(pred, target)
    assert got["cosine_median"] == pytest.approx(np.percentile(cos, 50), abs=1e-6)
    assert got["cosine_p10"] == pytest.approx(np.percentile(cos, 10), abs=1e-6)
    assert got["cosine"] == pytest.approx(cos.mean(), abs=1e-6)  # the mean over cells, not over batches
    assert got["cosine_p10"] < got["cosine_median"] - 0.1  # the tail is a tail, not the 90th percentile


def _knn_accuracy(z_nk: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Leave-one-out cosine kNN accuracy from scikit-learn's neighbours, by the documented rule: the majority
    label among the k nearest, a tie going to the label with the larger summed cosine similarity."""
    dist, idx = NearestNeighbors(n_neighbors=k, metric="cosine").fit(z_nk).kneighbors()  # excludes the cell itself
    right = 0
    for cell in range(len(labels)):
        votes = pd.DataFrame({"label": labels[idx[cell]], "sim": 1 - dist[cell]}).groupby("label")["sim"]
        ranked = pd.DataFrame({"n": votes.size(), "sim": votes.sum()}).sort_values(["n", "sim"], ascending=False)
        right += ranked.index[0] == labels[cell]
    return right / len(labels)


def test_logged_knn_accuracy_matches_scikit_learn_on_the_test_cells(compose_cfg, pbmc):
    """The test cells' latents, read back through exprae.embed, give scikit-learn's leave-one-out accuracy."""
    cfg = compose_cfg("aux.label_key=bulk_labels", "trainer.max_epochs=1", "model.latent_dim=8", "logger=none")
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)
    split = pd.read_csv(run / rundir.SPLIT_FILE)
    test_cells = pbmc[split["obs_name"][split["split"] == "test"].to_numpy()].copy()
    exprae.embed(exprae.load(run, device="cpu"), test_cells)
    expected = _knn_accuracy(test_cells.obsm["X_exprae"], test_cells.obs["bulk_labels"].to_numpy(), k=15)
    # One cell is 1/70: the two agree to float precision or differ by whole cells.
    assert metrics["test"]["model"]["knn_accuracy"] == pytest.approx(expected, abs=1e-6)
    assert expected > 0.3  # 10 labels: well above chance, so the comparison is not between two trivial numbers


def test_dispersion_agreement_is_scipys_pearson_and_spearman():
    from exprae.training.module import dispersion_agreement

    rng = np.random.default_rng(1)
    # Log dispersions around 2 with a shared component: an uncentred cosine would be ~0.99, Pearson ~0.6.
    true = 2.0 + rng.normal(size=200)
    learned = 2.0 + 0.6 * (true - 2.0) + 0.8 * rng.normal(size=200)
    true_with_nan = np.append(true, np.nan)  # genes without a true dispersion are skipped
    got = dispersion_agreement(torch.from_numpy(np.append(learned, 5.0)), torch.from_numpy(true_with_nan))
    assert got["dispersion_pearson"].item() == pytest.approx(stats.pearsonr(learned, true).statistic, abs=1e-6)
    assert got["dispersion_spearman"].item() == pytest.approx(stats.spearmanr(learned, true).statistic, abs=1e-6)
