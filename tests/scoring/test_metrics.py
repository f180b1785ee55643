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
    from exprae.scoring.metrics import dispersion_agreement

    rng = np.random.default_rng(1)
    # Log dispersions around 2 with a shared component: an uncentred cosine would be ~0.99, Pearson ~0.6.
    true = 2.0 + rng.normal(size=200)
    learned = 2.0 + 0.6 * (true - 2.0) + 0.8 * rng.normal(size=200)
    true_with_nan = np.append(true, np.nan)  # genes without a true dispersion are skipped
    got = dispersion_agreement(torch.from_numpy(np.append(learned, 5.0)), torch.from_numpy(true_with_nan))
    assert got["dispersion_pearson"].item() == pytest.approx(stats.pearsonr(learned, true).statistic, abs=1e-6)
    assert got["dispersion_spearman"].item() == pytest.approx(stats.spearmanr(learned, true).statistic, abs=1e-6)


def _numpy_scores(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Cosine, Pearson r (scipy) and MSE of one cell, on the entries given."""
    cos = float(pred @ target / (np.linalg.norm(pred) * np.linalg.norm(target)))
    return {
        "cosine": cos,
        "pearson": float(stats.pearsonr(pred, target).statistic),
        "mse": float(np.mean((pred - target) ** 2)),
    }


def test_per_cell_scores_are_numpys_and_scipys_on_each_cells_masked_entries():
    from exprae.scoring.metrics import per_cell_metrics

    rng = np.random.default_rng(3)
    # Offsets and scales that differ by cell and by entry, so centring on the wrong mean or over the wrong
    # entries, or averaging over all genes instead of the masked ones, moves every score.
    target = rng.normal(size=(5, 30)) * 2.0 + 3.0
    pred = target + rng.normal(size=(5, 30)) + np.arange(30) * 0.1
    mask = rng.random((5, 30)) < 0.4
    mask[4] = False  # a cell with nothing masked is scored 0
    got = per_cell_metrics(torch.tensor(pred), torch.tensor(target), mask_ng=torch.tensor(mask))
    for cell in range(4):
        want = _numpy_scores(pred[cell, mask[cell]], target[cell, mask[cell]])
        for name, value in want.items():
            assert got[name][cell].item() == pytest.approx(value, abs=1e-5), (name, cell)
    for name in ("cosine", "pearson", "mse"):
        assert got[name][4].item() == 0.0
        assert got[name].dtype == torch.float32
    plain = per_cell_metrics(torch.tensor(pred), torch.tensor(target))
    for cell in range(5):
        for name, value in _numpy_scores(pred[cell], target[cell]).items():
            assert plain[name][cell].item() == pytest.approx(value, abs=1e-5), (name, cell)


def test_masked_update_skips_cells_without_hidden_entries_and_averages_the_loss_over_cells():
    rng = np.random.default_rng(4)
    target = torch.tensor(rng.normal(size=(6, 10)), dtype=torch.float32)
    pred = target + torch.tensor(rng.normal(size=(6, 10)), dtype=torch.float32)
    mask = torch.tensor(rng.random((6, 10)) < 0.5)
    mask[[1, 4]] = False
    loss = torch.arange(6, dtype=torch.float32)
    metric = ReconstructionMetrics()
    metric.update(pred[:3], target[:3], loss[:3], mask_ng=mask[:3])
    metric.update(pred[3:], target[3:], loss[3:], mask_ng=mask[3:])
    got = metric.compute()
    from exprae.scoring.metrics import per_cell_metrics

    keep = [0, 2, 3, 5]
    each = per_cell_metrics(pred[keep], target[keep], mask_ng=mask[keep])
    for name in ("cosine", "pearson", "mse"):
        assert got[name].item() == pytest.approx(each[name].mean().item(), abs=1e-6), name
    assert got["loss"].item() == pytest.approx(np.mean([0, 2, 3, 5]))
    # torch's median of an even number of cells is the lower middle value (numpy's method="lower").
    lower_median = np.percentile(each["cosine"].numpy(), 50, method="lower")
    assert got["cosine_median"].item() == pytest.approx(lower_median, abs=1e-6)
    # Without losses there is no loss entry; without cells no quantiles, and the means are 0, not NaN.
    bare = ReconstructionMetrics()
    bare.update(pred, target)
    assert "loss" not in bare.compute()
    assert bare.compute()["mse"].item() == pytest.approx(((pred - target) ** 2).mean().item(), rel=1e-5)
    empty = ReconstructionMetrics().compute()
    assert "cosine_median" not in empty and empty["cosine"].item() == 0.0


def test_one_cell_with_one_masked_entry_is_scored_on_that_entry_alone():
    # The smallest counts a mean can divide by: one masked entry in a cell, one cell in the metric, one loss.
    from exprae.scoring.metrics import per_cell_metrics

    pred, target = torch.tensor([[1.0, 5.0, 2.0]]), torch.tensor([[0.0, 2.0, 2.0]])
    mask = torch.tensor([[False, True, False]])
    assert per_cell_metrics(pred, target, mask_ng=mask)["mse"].item() == pytest.approx(9.0)
    metric = ReconstructionMetrics()
    metric.update(pred, target, torch.tensor([0.7]), mask_ng=mask)
    got = metric.compute()
    assert got["mse"].item() == pytest.approx(9.0) and got["loss"].item() == pytest.approx(0.7)
    no_loss = ReconstructionMetrics()
    no_loss.update(pred, target, mask_ng=mask)  # a masked update without losses
    assert "loss" not in no_loss.compute() and no_loss.compute()["mse"].item() == pytest.approx(9.0)
