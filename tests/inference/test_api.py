"""exprae.load / exprae.embed on real runs: keys, gene alignment, preprocessing, safe loading."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import yaml

import exprae
from conftest import train_run
from exprae.data import ExpressionDataModule
from exprae.data.datasets import synthetic_counts
from exprae.inference import GeneMismatchError, UnsafeCheckpointError
from exprae.losses import cosine_similarity
from exprae.runs import rundir


@pytest.fixture(scope="module")
def model(pbmc_run):
    return exprae.load(pbmc_run, device="cpu")


def test_embed_writes_every_key_with_right_shapes(model, pbmc):
    adata = pbmc.copy()
    out = exprae.embed(model, adata, baselines=True)
    assert out is adata  # in place, scanpy style
    assert adata.obsm["X_exprae"].shape == (700, 8)
    assert adata.layers["exprae_recon"].shape == (700, 765)
    for key in ("exprae_cosine", "exprae_mse", "exprae_pca_cosine", "exprae_meanprofile_cosine"):
        assert adata.obs[key].shape == (700,)
        assert np.isfinite(adata.obs[key]).all(), key
    assert np.isfinite(adata.obsm["X_exprae"]).all()
    assert np.isfinite(adata.layers["exprae_recon"]).all()  # the model covers every gene here
    # Per-gene r covers the 140 held-out cells: NaN exactly for the genes constant across them.
    held = (adata.obs["exprae_split"] != "train").to_numpy()
    constant = np.ptp(np.asarray(pbmc.X)[held], axis=0) == 0
    assert np.isfinite(adata.var["exprae_gene_r"][~constant]).all()
    assert adata.var["exprae_gene_r"][constant].isna().all()
    assert ((adata.obs["exprae_cosine"] >= -1) & (adata.obs["exprae_cosine"] <= 1)).all()
    assert (adata.obs["exprae_mse"] >= 0).all()
    settings = adata.uns["exprae"]
    assert settings["n_model_genes"] == 765 and settings["n_missing_genes"] == 0
    assert settings["layer"] == "X" and settings["latent_dim"] == 8
    # A trained model beats the mean profile on nearly every cell: measured on all 700 at seeds 0, 1 and 2 (PCA-8
    # alone does too; the mean profile's per-cell cosine on scaled X averages -0.02). 0.99 leaves 7 cells of slack.
    assert (adata.obs["exprae_cosine"] > adata.obs["exprae_meanprofile_cosine"]).mean() >= 0.99


def test_metrics_match_a_direct_computation(model, pbmc):
    adata = exprae.embed(model, pbmc, copy=True)
    x_ng = torch.from_numpy(np.asarray(pbmc.X, dtype=np.float32))
    with torch.no_grad():
        out = model.net(x_ng)
    np.testing.assert_allclose(adata.obsm["X_exprae"], out["z"].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adata.layers["exprae_recon"], out["recon"].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adata.obs["exprae_cosine"], cosine_similarity(out["recon"], x_ng).numpy(), atol=1e-5)
    np.testing.assert_allclose(adata.obs["exprae_mse"], (out["recon"] - x_ng).pow(2).mean(1).numpy(), rtol=1e-5)
    recon = out["recon"].numpy()
    held = (adata.obs["exprae_split"] != "train").to_numpy()  # per-gene r leaves the training cells out
    for g in (0, 100, 764):
        expected = np.corrcoef(pbmc.X[held, g], recon[held, g])[0, 1]
        assert adata.var["exprae_gene_r"].iloc[g] == pytest.approx(expected, abs=1e-5)


def test_key_added_copy_batch_size_and_sparse_input(model, pbmc):
    reference = exprae.embed(model, pbmc, copy=True)
    assert "X_exprae" not in pbmc.obsm  # copy=True left the input alone
    sparse = pbmc.copy()
    sparse.X = sp.csr_matrix(sparse.X)
    other = exprae.embed(model, sparse, key_added="ae2", batch_size=37, copy=True)
    assert {"X_ae2"} <= set(other.obsm) and "ae2_recon" in other.layers and "ae2_gene_r" in other.var
    assert {"ae2_cosine", "ae2_mse"} <= set(other.obs) and "ae2" in other.uns
    assert sp.issparse(other.X)  # the input matrix stays sparse
    np.testing.assert_allclose(other.obsm["X_ae2"], reference.obsm["X_exprae"], atol=1e-5)
    np.testing.assert_allclose(other.obs["ae2_cosine"], reference.obs["exprae_cosine"], atol=1e-5)
    np.testing.assert_allclose(other.var["ae2_gene_r"], reference.var["exprae_gene_r"], atol=1e-5)


def test_permuted_gene_order_gives_the_same_result(model, pbmc):
    reference = exprae.embed(model, pbmc, copy=True)
    perm = np.random.default_rng(0).permutation(pbmc.n_vars)
    shuffled = exprae.embed(model, pbmc[:, perm].copy())
    np.testing.assert_allclose(shuffled.obsm["X_exprae"], reference.obsm["X_exprae"], atol=1e-6)
    np.testing.assert_allclose(shuffled.obs["exprae_cosine"], reference.obs["exprae_cosine"], atol=1e-6)
    # Per-gene results follow the genes, not the column positions.
    back = shuffled[:, reference.var_names]
    np.testing.assert_allclose(back.layers["exprae_recon"], reference.layers["exprae_recon"], atol=1e-6)
    np.testing.assert_allclose(back.var["exprae_gene_r"], reference.var["exprae_gene_r"], atol=1e-6)


def test_missing_genes_are_a_clear_error_naming_them(model, pbmc):
    dropped = ["CD79A", "MS4A1", "NKG7"]
    subset = pbmc[:, ~pbmc.var_names.isin(dropped)].copy()
    with pytest.raises(GeneMismatchError, match="3 of the 765 genes") as info:
        exprae.embed(model, subset)
    for gene in dropped:
        assert gene in str(info.value)
    assert "allow_missing_genes" in str(info.value)
    assert "X_exprae" not in subset.obsm  # nothing half-written


def test_zero_fill_is_opt_in_and_warns_with_the_count(model, pbmc):
    dropped = list(pbmc.var_names[:12])
    subset = pbmc[:, 12:].copy()
    with pytest.warns(UserWarning, match="12 of the model's 765 genes are missing"):
        exprae.embed(model, subset, allow_missing_genes=True)
    assert subset.uns["exprae"]["n_missing_genes"] == 12
    assert list(subset.uns["exprae"]["missing_genes"]) == dropped
    assert subset.layers["exprae_recon"].shape == (700, 753)
    assert np.isfinite(subset.obs["exprae_cosine"]).all() and np.isfinite(subset.obsm["X_exprae"]).all()


def test_missing_genes_are_zero_filled_and_scores_use_the_present_genes_only(model, pbmc):
    """A hand-made case: 5 genes dropped from 40 cells. The run's preprocessing is the identity (X as given), so
    zero-filling means the model sees those genes at 0; its scores must cover the 760 genes actually measured."""
    dropped = ["CD79A", "MS4A1", "NKG7", "GNLY", "LYZ"]
    cells = pbmc[:40].copy()
    subset = cells[:, ~cells.var_names.isin(dropped)].copy()
    with pytest.warns(UserWarning, match="5 of the model's 765 genes are missing"):
        exprae.embed(model, subset, allow_missing_genes=True)
    zeroed = cells.copy()
    zeroed.X[:, zeroed.var_names.isin(dropped)] = 0.0  # what zero-filling must feed the model
    exprae.embed(model, zeroed)
    np.testing.assert_allclose(subset.obsm["X_exprae"], zeroed.obsm["X_exprae"], atol=1e-5)
    present = ~zeroed.var_names.isin(dropped)
    x_ng = np.asarray(zeroed.X, dtype=np.float64)[:, present]
    recon_ng = np.asarray(zeroed.layers["exprae_recon"], dtype=np.float64)[:, present]
    cosine = (x_ng * recon_ng).sum(1) / (np.linalg.norm(x_ng, axis=1) * np.linalg.norm(recon_ng, axis=1))
    np.testing.assert_allclose(subset.obs["exprae_cosine"], cosine, atol=1e-5)
    np.testing.assert_allclose(subset.obs["exprae_mse"], ((x_ng - recon_ng) ** 2).mean(1), rtol=1e-4)
    # Scoring the zero-filled genes too would change the values (the model predicts them far from 0).
    assert np.abs(zeroed.obs["exprae_cosine"] - cosine).max() > 1e-3
    np.testing.assert_allclose(
        subset.var["exprae_gene_r"], zeroed.var["exprae_gene_r"][subset.var_names].to_numpy(), atol=1e-5
    )


def test_layer_raw_and_a_missing_layer(model, pbmc):
    with pytest.raises(KeyError, match="available layers"):
        exprae.embed(model, pbmc.copy(), layer="counts")
    adata = exprae.embed(model, pbmc, layer="raw", copy=True)
    assert adata.uns["exprae"]["layer"] == "raw" and np.isfinite(adata.obs["exprae_cosine"]).all()


def test_nan_in_the_data_is_refused_with_cells_named(model, pbmc):
    bad = pbmc.copy()
    bad.X[3, 5] = np.nan
    with pytest.raises(ValueError, match=rf"1 NaN or infinite values.*{bad.obs_names[3]}"):
        exprae.embed(model, bad)


def test_load_run_dir_checkpoint_or_last(pbmc_run, tmp_path, pbmc):
    from_dir = exprae.load(pbmc_run, device="cpu")
    assert from_dir.checkpoint.name == "best.ckpt"
    from_file = exprae.load(pbmc_run / "checkpoints" / "best.ckpt", device="cpu")
    assert from_file.run_dir == pbmc_run and from_file.var_names == from_dir.var_names
    copy = shutil.copytree(pbmc_run, tmp_path / "run")
    (copy / "checkpoints" / "best.ckpt").unlink()
    assert exprae.load(copy, device="cpu").checkpoint.name == "last.ckpt"
    shutil.rmtree(copy / "checkpoints")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        exprae.load(copy)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        exprae.load(tmp_path / "nowhere")


def test_config_target_outside_exprae_and_torch_is_refused(pbmc_run, tmp_path):
    copy = shutil.copytree(pbmc_run, tmp_path / "run")
    config = copy / rundir.CONFIG_FILE
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["activation"] = {"_target_": "os.system", "command": "touch pwned"}
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(UnsafeCheckpointError, match=r"os\.system"):
        exprae.load(copy)


def test_checkpoint_that_does_not_fit_its_config_is_a_clear_error(pbmc_run, tmp_path):
    """An older checkpoint without the gene-unit buffers, or a config edited after training, names the keys."""
    old = shutil.copytree(pbmc_run, tmp_path / "old")
    path = old / "checkpoints" / "best.ckpt"
    ckpt = torch.load(path, weights_only=True)
    for key in ("net.center_g", "net.scale_g"):
        del ckpt["state_dict"][key]
    torch.save(ckpt, path)
    with pytest.raises(
        ValueError, match=r"does not match .*another exprae version.*missing \['net.center_g', 'net.scale_g'\]"
    ):
        exprae.load(old)

    edited = shutil.copytree(pbmc_run, tmp_path / "edited")
    config = edited / rundir.CONFIG_FILE
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["latent_dim"] = 4  # trained with 8
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(
        ValueError, match=r"does not match .*size mismatch for net\.encoder\.8\.weight: .*torch\.Size\(\[8, 128\]\)"
    ):
        exprae.load(edited)


class WritesMarker:
    """Unpickling this runs ``exec``: the shape of a real malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def write_malicious_checkpoint(run_dir: Path, marker: Path) -> Path:
    """Replace a run's best checkpoint by a torch file holding the real weights plus a code-running pickle."""
    path = run_dir / "checkpoints" / "best.ckpt"
    state = torch.load(path, weights_only=True)["state_dict"]
    torch.save({"state_dict": state, "epoch": 0, "payload": WritesMarker(marker)}, path)
    return path


def test_malicious_checkpoint_is_refused_without_running_code(pbmc_run, tmp_path):
    run = shutil.copytree(pbmc_run, tmp_path / "run")
    marker = tmp_path / "marker.txt"
    ckpt = write_malicious_checkpoint(run, marker)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*best\.ckpt"):
        exprae.load(run)
    with pytest.raises(UnsafeCheckpointError):
        exprae.load(ckpt)
    assert not marker.exists()
    # The file really is malicious: an unsafe load runs its code.
    torch.load(ckpt, weights_only=False)
    assert marker.read_text() == "code ran"


def test_hvg_model_applies_the_saved_preprocessing(tmp_path):
    """A counts model with normalize/log1p/HVG/scale: embed preprocesses exactly as training did."""
    synth = ["data=synthetic", "data.synthetic.n_cells=300", "data.synthetic.n_genes=200"]
    pre = ["data.preprocess.n_top_genes=50", "data.preprocess.scale=true", "data.preprocess.max_value=10"]
    run = train_run(tmp_path / "run", *synth, *pre, "trainer.max_epochs=1", "model.latent_dim=4", "data.batch_size=64")
    model = exprae.load(run, device="cpu")
    assert 50 <= len(model.var_names) < 200  # seurat HVG keeps ties at the cut
    counts = synthetic_counts(n_cells=300, n_genes=200, n_types=8, seed=0)
    # The datamodule's own preprocessing of the same cells is what the network was trained on.
    datamodule = ExpressionDataModule(
        dataset="synthetic",
        synthetic={"n_cells": 300, "n_genes": 200, "n_types": 8, "seed": 0},
        preprocess={"normalize_total": 1e4, "log1p": True, "n_top_genes": 50, "scale": True, "max_value": 10},
        stratify_key="cell_type",
        batch_size=64,
    )
    datamodule.setup("fit")
    assert datamodule.var_names == model.var_names
    np.testing.assert_allclose(model.transform(counts).X, datamodule.adata.X, atol=1e-5)

    adata = exprae.embed(model, counts[:, ::-1].copy(), batch_size=100)
    assert sp.issparse(adata.X)
    in_model = adata.var_names.isin(model.var_names)
    # A model of a gene subset: the reconstruction covers its genes only (obsm), never a NaN-padded layer.
    assert "exprae_recon" not in adata.layers
    recon = adata.obsm["exprae_recon"]
    assert recon.shape == (300, len(model.var_names)) and np.isfinite(recon).all()
    assert set(adata.uns["exprae"]["recon_var_names"]) == set(model.var_names)
    assert adata.uns["exprae"]["keys"]["recon"] == "obsm/exprae_recon"
    # Its columns follow recon_var_names: the layout the docs promise (checked against layout="layer").
    padded = exprae.embed(model, counts[:, ::-1].copy(), batch_size=100, recon="layer")
    names = list(adata.uns["exprae"]["recon_var_names"])
    np.testing.assert_allclose(padded[:, names].layers["exprae_recon"], recon, atol=1e-6)
    assert np.isnan(padded.layers["exprae_recon"][:, ~in_model]).all()
    skipped = exprae.embed(model, counts.copy(), recon="none")
    assert "exprae_recon" not in skipped.obsm and "exprae_recon" not in skipped.layers
    assert {"exprae_cosine", "exprae_pearson", "exprae_mse", "exprae_split"} <= set(skipped.obs)
    with pytest.raises(ValueError, match="recon='dense' is not one of"):
        exprae.embed(model, counts.copy(), recon="dense")
    assert (
        np.isfinite(adata.var["exprae_gene_r"][in_model]).all() and adata.var["exprae_gene_r"][~in_model].isna().all()
    )
    assert adata.uns["exprae"]["preprocess"]["n_top_genes"] == 50
    assert adata.uns["exprae"]["n_model_genes"] == len(model.var_names)
    x_ng = torch.from_numpy(datamodule.adata.X)
    with torch.no_grad():
        z = model.net(x_ng)["z"].numpy()
    np.testing.assert_allclose(adata.obsm["X_exprae"], z, atol=1e-4)
    # Negative "counts" cannot be log-normalised: refused before any work.
    negative = counts.copy()
    negative.X = negative.X.toarray() - 1
    with pytest.raises(ValueError, match="negative"):
        exprae.embed(model, negative)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: checks embed on the GPU matches the CPU")
def test_embed_on_gpu_matches_cpu(pbmc_run, pbmc):
    sparse = pbmc.copy()
    sparse.X = sp.csr_matrix(sparse.X)
    on_cpu = exprae.embed(exprae.load(pbmc_run, device="cpu"), sparse, copy=True)
    gpu_model = exprae.load(pbmc_run, device="cuda")
    assert gpu_model.device.type == "cuda"
    on_gpu = exprae.embed(gpu_model, sparse, copy=True, batch_size=256)
    np.testing.assert_allclose(on_gpu.obsm["X_exprae"], on_cpu.obsm["X_exprae"], rtol=2e-3, atol=1e-3)
    np.testing.assert_allclose(on_gpu.obs["exprae_cosine"], on_cpu.obs["exprae_cosine"], rtol=2e-3, atol=1e-3)
    np.testing.assert_allclose(on_gpu.var["exprae_gene_r"], on_cpu.var["exprae_gene_r"], rtol=2e-3, atol=1e-3)
