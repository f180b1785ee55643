"""MCV scores: hand-computed on tiny matrices, and end to end for the model and both baselines."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import poisson

from exprae.constants import INDEX_KEY, MCV_COUNTS_KEY, MCV_TARGET_KEY, SIZE_FACTOR_KEY, X_KEY
from exprae.data.mcv import MoleculeSplit
from exprae.data.preprocessing import Preprocessing
from exprae.nn.count_head import count_parameters
from exprae.scoring.mcv import MCVScorer, poisson_nll
from exprae.train import train

MCV = ["data.mcv.fraction=0.5", "data.mcv.seed=1"]
SMALL = ["model.latent_dim=4", "model.hidden_dims=[32]", "logger=none", "data.synthetic.n_cells=400"]
SMALL += ["data.synthetic.n_genes=60", "data.batch_size=50"]


def scorer(**preprocess) -> MCVScorer:
    pre = Preprocessing(**preprocess)
    pre.genes = ["a", "b", "c"]
    if pre.scale:
        pre.scale_mean, pre.scale_std = [1.0, 0.0, 2.0], [2.0, 1.0, 0.5]
    return MCVScorer(MoleculeSplit(fraction=0.5), pre, n_samples=4000)


def test_poisson_score_by_hand():
    counts = torch.tensor([[0.0, 2.0, 5.0]])
    mean = torch.tensor([[0.5, 2.0, 0.0]])  # the last is floored to one hundredth of a molecule
    by_hand = np.mean([poisson.logpmf(0, 0.5), poisson.logpmf(2, 2.0), poisson.logpmf(5, 0.01)]) * -1
    assert poisson_nll(counts, mean).item() == pytest.approx(by_hand, rel=1e-5)


def test_expression_maps_back_to_counts_through_the_inverse_preprocessing():
    s = scorer(normalize_total=1e4, log1p=True, scale=True)
    counts_ng = torch.tensor([[3.0, 0.0, 12.0]])
    size_factor_n = torch.tensor([0.5])
    recon = s.view(counts_ng, size_factor_n)  # counts -> the input space, then back
    np.testing.assert_allclose(s.count_mean(recon_ng=recon, size_factor_n=size_factor_n), counts_ng, rtol=1e-5)


def test_count_model_predicts_the_expected_log_not_the_log_of_the_mean():
    s = scorer(normalize_total=1e4, log1p=True)
    mu = torch.tensor([[0.3, 2.0, 15.0]])
    size_factor_n = torch.tensor([2.0])
    pred = s.expected_view({"log_mu": mu.log()}, size_factor_n, stream=0)
    k = np.arange(200)
    exact = [(poisson.pmf(k, m) * np.log1p(2.0 * k)).sum() for m in mu[0].tolist()]
    # 4,000 draws: the Monte Carlo error of each mean is below 0.02 here (sd of log1p(2c) < 0.9).
    np.testing.assert_allclose(pred[0].numpy(), exact, atol=0.05)
    assert (torch.log1p(2.0 * mu[0]) - pred[0])[0] > 0.1  # log1p of the mean is 0.16 too high at mu = 0.3
    again = s.expected_view({"log_mu": mu.log()}, size_factor_n, stream=0)
    assert torch.equal(pred, again)  # a fixed seed: the same score every time


def test_nb_draws_are_overdispersed():
    s = scorer()  # raw counts: view is the identity, so E[view(c)] is the NB mean
    mu = torch.full((1, 3), 4.0)
    pred_nb = s.expected_view({"log_mu": mu.log(), "log_theta": torch.zeros(1, 3)}, None, stream=5)
    np.testing.assert_allclose(pred_nb[0].numpy(), 4.0, atol=0.25)


def test_every_method_is_scored_on_held_out_molecules(compose_cfg):
    """The mean profile's MCV scores equal a recomputation from the data; model and PCA get their own."""
    cfg = compose_cfg("data=synthetic_counts", *MCV, *SMALL, "trainer.max_epochs=2")
    metrics = train(cfg)
    for stage in ("val", "test"):
        for who in ("model", "mean", "pca"):
            scores = metrics[stage][who]
            assert {"mcv_mse", "mcv_cosine", "mcv_pearson", "mcv_poisson"} <= set(scores), (stage, who)
    from exprae.train import build

    datamodule, _ = build(cfg)
    train_x = datamodule.split_dataset("train").x.toarray()
    test = datamodule.split_dataset("test")
    target, held_counts = test.scored[MCV_TARGET_KEY], test.scored[MCV_COUNTS_KEY]
    target = target.toarray() if hasattr(target, "toarray") else target
    held_counts = held_counts.toarray() if hasattr(held_counts, "toarray") else held_counts
    mean_g = train_x.mean(axis=0)
    by_hand = ((mean_g - target) ** 2).mean(axis=1).mean()
    assert metrics["test"]["mean"]["mcv_mse"] == pytest.approx(by_hand, rel=1e-4)
    nll = -poisson.logpmf(held_counts, np.maximum(mean_g, 1e-2)).mean(axis=1).mean()
    assert metrics["test"]["mean"]["mcv_poisson"] == pytest.approx(nll, rel=1e-4)
    # Denoising shows: the trained model and PCA beat the mean profile on the held-out molecules.
    assert metrics["test"]["pca"]["mcv_mse"] < metrics["test"]["mean"]["mcv_mse"]
    assert math.isfinite(metrics["test"]["model"]["mcv_mse"])
    # cells.csv holds the per-cell MCV scores behind those means (what exprae-compare pairs cell by cell).
    cells = pd.read_csv(Path(cfg.paths.output_dir) / "cells.csv")
    for stage in ("val", "test"):
        rows = cells[cells["split"] == stage]
        for who, prefix in (("model", ""), ("pca", "pca_"), ("mean", "meanprofile_")):
            for name in ("mcv_mse", "mcv_cosine", "mcv_pearson", "mcv_poisson"):
                assert rows[prefix + name].mean() == pytest.approx(metrics[stage][who][name], rel=1e-4), (stage, who)
    test_rows = cells[cells["split"] == "test"].set_index("obs_name")
    names = np.asarray(datamodule.adata.obs_names)[datamodule.splits["test"]]
    per_cell = pd.Series(((mean_g - target) ** 2).mean(axis=1), index=names)
    np.testing.assert_allclose(test_rows.loc[names, "meanprofile_mcv_mse"], per_cell, rtol=1e-4)


def test_count_model_is_scored_and_mcv_can_judge_checkpoints(compose_cfg):
    monitor = ["callbacks.model_checkpoint.monitor=val/mcv_mse"]
    cfg = compose_cfg("data=synthetic", "loss=nb", *MCV, *SMALL, *monitor, "trainer.max_epochs=3")
    metrics = train(cfg)
    assert metrics["start"]["monitor"] == "val/mcv_mse"  # the PCA start competes on MCV
    assert metrics["test"]["model"]["mcv_mse"] < metrics["test"]["mean"]["mcv_mse"]
    # The count model's per-cell MCV scores come from the same seeded posterior draws as the logged mean.
    cells = pd.read_csv(Path(cfg.paths.output_dir) / "cells.csv")
    test_rows = cells[cells["split"] == "test"]
    assert test_rows["mcv_mse"].mean() == pytest.approx(metrics["test"]["model"]["mcv_mse"], rel=1e-4)
    assert test_rows["mcv_poisson"].mean() == pytest.approx(metrics["test"]["model"]["mcv_poisson"], rel=1e-4)


def test_mcv_monitor_is_refused_without_a_molecule_split(compose_cfg):
    from exprae.train import build

    _, module = build(compose_cfg("data=synthetic_counts", *SMALL))
    assert "val/mcv_mse" not in module.metric_names("val")
    _, module = build(compose_cfg("data=synthetic_counts", *MCV, *SMALL))
    assert {"val/mcv_mse", "val/mcv_poisson"} <= module.metric_names("val")


@pytest.mark.slow
def test_short_mcv_run_on_real_pbmc4k_counts(compose_cfg, realdata):
    path = realdata("pbmc4k_soupx.h5ad")
    overrides = ["data=h5ad", f"data.path={path}", *MCV, "data.preprocess.n_top_genes=500", "model.latent_dim=8"]
    metrics = train(compose_cfg(*overrides, "logger=none", "trainer.max_epochs=2"))
    test = metrics["test"]
    # Real counts: PCA and the model denoise, so they predict the held-out half better than the average cell.
    assert test["pca"]["mcv_mse"] < test["mean"]["mcv_mse"]
    assert test["model"]["mcv_mse"] < test["mean"]["mcv_mse"]
    # Against x'' a reconstruction scores worse than against its own noisy input x' (it cannot fit x'''s noise).
    assert test["model"]["mcv_mse"] > test["model"]["mse"]


def test_real_counts_experiment_composes_and_monitors_mcv(compose_cfg, tmp_path):
    from exprae.data.datasets import synthetic_counts
    from exprae.train import build

    path = tmp_path / "counts.h5ad"
    synthetic_counts(300, 120, n_types=4, store_truth=False, seed=0).write_h5ad(path)
    cfg = compose_cfg("experiment=real_counts", f"data.path={path}", "data.preprocess.n_top_genes=50")
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert set(params["loss"]) == {"mse", "cosine", "mixed", "pearson", "poisson", "nb"}
    assert math.prod(len(v) for v in params.values()) == 54
    assert cfg.callbacks.model_checkpoint.monitor == "val/mcv_mse" == cfg.callbacks.early_stopping.monitor
    datamodule, module = build(cfg)
    assert datamodule.mcv.enabled and datamodule.n_genes == 50
    assert cfg.callbacks.model_checkpoint.monitor in module.metric_names("val")


def test_poisson_score_is_one_value_per_cell_over_the_last_axis():
    counts = torch.tensor([[0.0, 2.0, 5.0], [1.0, 1.0, 1.0]])
    mean = torch.tensor([[0.5, 2.0, 4.0], [1.0, 2.0, 3.0]])
    per_cell = poisson_nll(counts, mean)
    assert per_cell.shape == (2,)
    for cell in range(2):
        want = -np.mean(poisson.logpmf(counts[cell].numpy(), mean[cell].numpy()))
        assert per_cell[cell].item() == pytest.approx(want, rel=1e-5)
        assert poisson_nll(counts[cell], mean[cell]).item() == pytest.approx(want, rel=1e-5)  # one cell's vector


def test_scores_follow_the_batch_to_its_device():
    # The scorer's input view moves to the device of the batch it is given: on a CPU machine the "meta" device
    # stands in for a GPU (the view's flags cannot be read there, so the move itself is checked).
    s = scorer(normalize_total=1e4, log1p=True, scale=True)
    moved = s._view_on(torch.device("meta"))
    assert moved is s.view and s.view.scale_mean_g.device.type == "meta"
    assert s._view_on(torch.device("meta")) is moved  # already there: not moved again


@pytest.mark.parametrize("mcv", [True, False], ids=["molecule-split", "no-split"])
def test_a_count_model_is_scored_against_the_expected_truth_with_its_sampled_expectation(compose_cfg, mcv):
    """Against E[T(x)] a count model predicts with its predictive draws (at x'''s depth, or x's without MCV), as
    for MCV, not with T of its mean; the scores of every method land under *_to_expected_truth and *_to_rate_truth."""
    from exprae.train import build

    cfg = compose_cfg("data=synthetic", "loss=nb", *(MCV if mcv else []), *SMALL)
    datamodule, module = build(cfg)
    assert module.data.expected_truths == ("expected_truth", "rate_truth")
    assert module.predictive.depth_ratio == 1.0 and (module.predictive is module.mcv) == mcv
    module.prepare_start()
    batch = datamodule.split_dataset("test")[np.arange(40)]
    with torch.no_grad():
        out = module(batch[X_KEY])
        recons = {"model": module.reconstruct(out, batch), "pca": batch[X_KEY]}
        preds = module.expected_profiles(out, batch, recons)
        sampled = module.predictive.expected_view(
            count_parameters(out, batch), batch.get(SIZE_FACTOR_KEY), stream=int(batch[INDEX_KEY][0])
        )
    torch.testing.assert_close(preds["model"], sampled)
    assert preds["pca"] is recons["pca"]  # an expression prediction is its reconstruction
    assert (preds["model"] - recons["model"]).abs().mean() > 0.05  # T of the mean is another prediction
    names = module.metric_names("test")
    assert {"test/mse_to_expected_truth", "test/cosine_to_rate_truth", "test/mse_to_truth"} <= names
