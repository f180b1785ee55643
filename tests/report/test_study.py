"""The MSE-vs-cosine study: PCA start, ground-truth and masked-entry scores, representations, reproducibility."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import hydra
import numpy as np
import pytest
import pytorch_lightning as pl
import scipy.sparse as sp
import torch
from omegaconf import open_dict

from exprae.constants import INDEX_KEY, TRUTH_KEY, X_KEY
from exprae.data import ExpressionDataModule
from exprae.nn.baselines import Baselines, SphericalPCA
from exprae.runs import rundir
from exprae.scoring.masking import InputMasker, hidden_entries
from exprae.scoring.metrics import per_cell_metrics
from exprae.train import build, train

QUIET = ["logger=none", "callbacks=none"]
TINY_SYNTHETIC = ["data=synthetic", "data.synthetic.n_cells=300", "data.synthetic.n_genes=120", "model.latent_dim=8"]


def _dense(m) -> np.ndarray:
    return m.toarray() if sp.issparse(m) else np.asarray(m)


def _split_tensors(dm: ExpressionDataModule, split: str) -> dict[str, torch.Tensor]:
    data = dm.split_dataset(split)
    return data[np.arange(len(data))]


def _fit_baselines(dm: ExpressionDataModule, latent_dim: int) -> Baselines:
    return Baselines(dm.n_genes, latent_dim).fit(dm.train_chunks())


# ---------------------------------------------------------------- 1. the default model starts where PCA ends


@pytest.mark.parametrize("data", ["pbmc68k", "pbmc68k_log", "pbmc68k_normalised"])
def test_pca_init_with_zero_steps_reconstructs_like_pca(compose_cfg, data):
    cfg = compose_cfg(f"data={data}", "model.latent_dim=8", *QUIET)
    dm, module = build(cfg)
    # The real path: Lightning calls module.setup("fit"), which fits PCA and starts the network there.
    trainer = pl.Trainer(max_steps=0, accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 0
    x_ng = _split_tensors(dm, "test")[X_KEY]
    pca_ng = module.baselines.pca(x_ng)
    scale = float(x_ng.abs().max())
    for train_mode in (False, True):  # dropout in the residual branches must not matter either
        module.train(train_mode)
        with torch.no_grad():
            recon_ng = module(x_ng)["recon"]
        torch.testing.assert_close(recon_ng, pca_ng, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_default_model_not_below_pca_after_short_run(compose_cfg, loss):
    """Early-stopped on its own val loss, the PCA-started model ends at or above PCA on held-out cells."""
    metrics = train(compose_cfg(f"loss={loss}", "trainer.max_epochs=6"))
    for stage in ("val", "test"):
        assert metrics[stage]["model"]["cosine"] >= metrics[stage]["pca"]["cosine"] - 0.005, stage
        assert metrics[stage]["model"]["mse"] <= metrics[stage]["pca"]["mse"] * 1.01, stage


# ---------------------------------------------------------------- 2. ground truth on synthetic data


def test_truth_is_preprocessed_like_the_input(compose_cfg):
    cfg = compose_cfg("data=synthetic_scaled", *TINY_SYNTHETIC[1:])
    dm: ExpressionDataModule = hydra.utils.instantiate(cfg.data)
    dm.setup()
    raw = dm.load_raw()
    true_ng = np.asarray(raw.layers[TRUTH_KEY], dtype=np.float64)
    assert true_ng.shape == (raw.n_obs, raw.n_vars) == (300, 120)
    # The truth is normalised by its own total (the true proportions), logged, and scaled with the
    # statistics fitted on the training cells' input: the same transform the input goes through.
    expected = np.log1p(true_ng / true_ng.sum(1, keepdims=True) * 1e4)
    expected = (expected - np.asarray(dm.preprocess.scale_mean)) / np.asarray(dm.preprocess.scale_std)
    np.testing.assert_allclose(_dense(dm.adata.layers[TRUTH_KEY]), expected, rtol=1e-4, atol=1e-4)
    x_ng = _dense(dm.adata.X)
    np.testing.assert_allclose(x_ng[dm.splits["train"]].mean(0), 0.0, atol=1e-4)  # input scaled by the same stats
    assert TRUTH_KEY in _split_tensors(dm, "val")


def test_truth_metrics_are_scored_on_the_test_cells(compose_cfg):
    cfg = compose_cfg(*TINY_SYNTHETIC, "trainer.max_epochs=1", *QUIET)
    metrics = train(cfg)
    dm: ExpressionDataModule = hydra.utils.instantiate(cfg.data)
    dm.setup()
    baselines = _fit_baselines(dm, 8)
    for stage in ("val", "test"):
        batch = _split_tensors(dm, stage)
        for who, recon in baselines(batch[X_KEY]).items():
            values = per_cell_metrics(recon, batch[TRUTH_KEY])
            for name in ("cosine", "mse", "pearson"):
                got = metrics[stage][who][f"{name}_to_truth"]
                assert got == pytest.approx(float(values[name].mean()), rel=1e-5, abs=1e-6), (stage, who, name)
        assert math.isfinite(metrics[stage]["model"]["cosine_to_truth"])
    # Denoising is measurable: PCA is closer to the truth than to the noisy input it reconstructs.
    assert metrics["test"]["pca"]["cosine_to_truth"] > metrics["test"]["pca"]["cosine"]


def test_no_truth_metrics_without_truth(compose_cfg):
    metrics = train(compose_cfg("trainer.fast_dev_run=true", *QUIET))
    assert not any(k.endswith("_to_truth") for who in metrics["test"].values() for k in who)


# ---------------------------------------------------------------- 3. masked-entry imputation score


def test_hidden_entries_are_a_seeded_fraction_of_nonzero_entries(pbmc):
    x_ng = torch.from_numpy(_dense(pbmc.raw.X)[:64].astype(np.float32))
    rows = torch.arange(64)
    hidden = hidden_entries(x_ng, rows, fraction=0.1, seed=3, stream="val", entries="nonzero")
    assert not (hidden & (x_ng == 0)).any()  # only non-zero entries are hidden
    nnz_n = (x_ng != 0).sum(1)
    assert torch.equal(hidden.sum(1), torch.floor(nnz_n * 0.1 + 0.5).long())
    hidden = hidden_entries(x_ng, rows, fraction=0.1, seed=3, stream="val")  # the default: over all entries
    assert (hidden & (x_ng == 0)).any() and torch.equal(hidden.sum(1), torch.full((64,), int(0.1 * 765 + 0.5)))
    # Deterministic per cell, whatever batch it falls in; another seed or stage hides other entries.
    again = torch.cat(
        [
            hidden_entries(x_ng[i : i + 10], rows[i : i + 10], fraction=0.1, seed=3, stream="val")
            for i in range(0, 64, 10)
        ]
    )
    assert torch.equal(hidden, again)
    assert not torch.equal(hidden, hidden_entries(x_ng, rows, fraction=0.1, seed=4, stream="val"))
    assert not torch.equal(hidden, hidden_entries(x_ng, rows, fraction=0.1, seed=3, stream="test"))
    with pytest.raises(ValueError, match="mask_fraction"):
        hidden_entries(x_ng, rows, fraction=1.0, seed=0, stream="val")


def test_masked_metrics_use_only_hidden_entries():
    gen = torch.Generator().manual_seed(0)
    target_ng = torch.randn(6, 40, generator=gen)
    pred_ng = target_ng + 0.5 * torch.randn(6, 40, generator=gen)
    mask_ng = torch.rand(6, 40, generator=gen) < 0.3
    scored = per_cell_metrics(pred_ng, target_ng, mask_ng=mask_ng)
    # Changing the prediction where nothing is hidden changes nothing.
    moved = per_cell_metrics(pred_ng + 100.0 * (~mask_ng), target_ng, mask_ng=mask_ng)
    for name in scored:
        torch.testing.assert_close(scored[name], moved[name])
    for n in range(6):
        sub = per_cell_metrics(pred_ng[n, mask_ng[n]][None], target_ng[n, mask_ng[n]][None])
        for name in scored:
            torch.testing.assert_close(scored[name][n], sub[name][0], rtol=1e-5, atol=1e-6)


def test_masked_scores_in_a_run_match_a_recomputation(compose_cfg):
    cfg = compose_cfg(
        "data=pbmc68k_log", "model.latent_dim=8", "trainer.max_epochs=1", "module.mask_fraction=0.2", *QUIET
    )
    metrics = train(cfg)
    dm, _ = build(cfg)
    baselines = _fit_baselines(dm, 8)
    batch = _split_tensors(dm, "test")
    hidden = hidden_entries(batch[X_KEY], batch[INDEX_KEY], fraction=0.2, seed=0, stream="test")
    # log-normalised pbmc68k was normalised before exprae: hidden entries take the gene's training mean only.
    masked_x = InputMasker(dm.n_genes).fit(dm.preprocess, mean_g=baselines.mean_g)(batch[X_KEY], hidden)
    torch.testing.assert_close(masked_x, torch.where(hidden, baselines.mean_g, batch[X_KEY]))
    recons = {"mean": baselines.mean_profile(masked_x), "pca": baselines.pca_observed(masked_x, ~hidden)}
    for who, recon in recons.items():
        values = per_cell_metrics(recon, batch[X_KEY], mask_ng=hidden)
        for name in ("cosine", "mse", "pearson"):
            got = metrics["test"][who][f"masked_{name}"]
            assert got == pytest.approx(float(values[name].mean()), rel=1e-5, abs=1e-6), (who, name)
    # Filling in what was hidden is harder than reconstructing the same entries when they were shown.
    shown = per_cell_metrics(baselines.pca(batch[X_KEY]), batch[X_KEY], mask_ng=hidden)
    assert metrics["test"]["pca"]["masked_mse"] > float(shown["mse"].mean())
    assert math.isfinite(metrics["test"]["model"]["masked_cosine"])


# ---------------------------------------------------------------- 4. input representations


def test_representations_of_pbmc68k(compose_cfg, pbmc):
    raw = _dense(pbmc.raw.X)
    expected = {"pbmc68k": _dense(pbmc.X), "pbmc68k_log": raw, "pbmc68k_normalised": np.expm1(raw)}
    for name, want in expected.items():
        dm: ExpressionDataModule = hydra.utils.instantiate(compose_cfg(f"data={name}").data)
        dm.setup()
        np.testing.assert_allclose(_dense(dm.adata.X), want, rtol=1e-6, atol=1e-6, err_msg=name)
    assert dm.contract()["preprocess"]["expm1"] is True


# ---------------------------------------------------------------- 5. the study experiments


@pytest.mark.parametrize(
    ("experiment", "n_runs", "datasets"),
    [
        ("mse_vs_cosine", 54, {"pbmc68k", "pbmc68k_log", "pbmc68k_normalised"}),
        ("mse_vs_cosine_synthetic", 72, {"synthetic_counts", "synthetic_normalised", "synthetic", "synthetic_scaled"}),
    ],
)
def test_study_experiments_compose(compose_cfg, experiment, n_runs, datasets):
    cfg = compose_cfg(f"experiment={experiment}")
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert set(params["data"]) == datasets
    assert set(params["loss"]) == {"mse", "cosine", "mixed"}
    assert params["model.latent_dim"] == ["8", "32"] and params["seed"] == ["0", "1", "2"]
    assert math.prod(len(v) for v in params.values()) == n_runs
    assert cfg.module.mask_fraction == 0.1 and cfg.trainer.accelerator == "cpu"
    for data, loss in itertools.product(sorted(datasets), params["loss"]):
        run = compose_cfg(f"experiment={experiment}", f"data={data}", f"loss={loss}")
        assert run.data.dataset == ("pbmc68k" if experiment == "mse_vs_cosine" else "synthetic")
        assert run.loss.get("alpha", 0.5) == 0.5


# ---------------------------------------------------------------- 6. reproducible numbers


def test_same_seed_gives_identical_metrics_json(compose_cfg, tmp_path):
    saved = []
    for attempt in ("a", "b"):
        cfg = compose_cfg(*TINY_SYNTHETIC, "loss=mixed", "trainer.max_epochs=2", "module.mask_fraction=0.1", "seed=7")
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / attempt)
        train(cfg)
        out = Path(cfg.paths.output_dir)
        saved.append((rundir.read_json(out / rundir.METRICS_FILE), rundir.read_json(out / rundir.ENVIRONMENT_FILE)))
    (first, env), (second, _) = saved
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)  # exact, bit for bit
    assert first["test"]["model"]["masked_cosine"] and first["test"]["model"]["cosine_to_truth"]
    assert env["seed"] == 7
    for key in ("torch", "pytorch_lightning", "anndata", "scanpy", "git_commit"):
        assert env[key], key


def test_spherical_pca_init_with_zero_steps_projects_onto_the_spherical_subspace(compose_cfg):
    """model.init=spherical_pca: the linear path starts as the projection onto the top components of the
    L2-normalised training cells, entered at the training mean; not the PCA start."""
    cfg = compose_cfg("model.latent_dim=8", "model.init=spherical_pca", *QUIET)
    dm, module = build(cfg)
    trainer = pl.Trainer(max_steps=0, accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=dm)
    x_ng = _split_tensors(dm, "test")[X_KEY]
    w_kg = SphericalPCA(dm.n_genes, 8).fit(dm.train_chunks()).components_kg
    mean_g = module.baselines.mean_g
    expected_ng = (x_ng - mean_g) @ w_kg.T @ w_kg + mean_g
    scale = float(x_ng.abs().max())
    module.eval()
    with torch.no_grad():
        recon_ng = module(x_ng)["recon"]
    torch.testing.assert_close(recon_ng, expected_ng, rtol=1e-4, atol=1e-5 * scale)
    assert float((recon_ng - module.baselines.pca(x_ng)).abs().max()) > 0.05 * scale
