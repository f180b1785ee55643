"""Training with a batch covariate end to end: the start, per-batch scores, save/load, transform_batch, predict."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import exprae
from conftest import train_run
from exprae import predict
from exprae.constants import BATCH_KEY, X_KEY
from exprae.errors import ConfigError, DataError, MissingKeyError
from exprae.train import build, format_report


@pytest.fixture(scope="module")
def phase_run(tmp_path_factory):
    """pbmc68k with the cell-cycle phase (G1 501, S 182, G2M 17 cells) as the batch."""
    out = tmp_path_factory.mktemp("phase_run")
    return train_run(out, "data.batch_key=phase", "trainer.max_epochs=2", "model.latent_dim=8")


def test_start_is_exactly_the_per_batch_pca_and_plain_pca_without_encoder_covariates(compose_cfg):
    for encode, baseline in (("true", "batch_pca"), ("false", "pca")):
        dm, module = build(
            compose_cfg("data.batch_key=phase", "model.latent_dim=8", f"model.encode_covariates={encode}")
        )
        module.prepare_start()  # build() handed it the training data
        module.eval()
        batch = next(iter(dm.val_dataloader()))
        with torch.no_grad():
            recon = module(batch[X_KEY], batch[BATCH_KEY])["recon"]
            expected = module.baselines(batch[X_KEY], batch[BATCH_KEY][:, 0])[baseline]
        torch.testing.assert_close(recon, expected, atol=1e-4, rtol=1e-4)


def test_metrics_per_batch_sum_back_to_the_global_ones(phase_run):
    metrics = json.loads((phase_run / "metrics.json").read_text())
    by_batch = metrics["by_batch"]
    assert by_batch["key"] == "phase" and by_batch["levels"] == ["G1", "G2M", "S"]
    for stage in ("val", "test"):
        n_cells = by_batch["n_cells"][stage]
        assert sum(n_cells.values()) == metrics["n_cells"][stage]
        for who in ("model", "mean", "pca", "batch_mean", "batch_pca"):
            scores = by_batch[stage][who]
            assert set(scores) == {lvl for lvl, n in n_cells.items() if n > 0}
            for name in ("cosine", "pearson", "mse"):
                weighted = sum(scores[lvl][name] * n_cells[lvl] for lvl in scores) / metrics["n_cells"][stage]
                assert weighted == pytest.approx(metrics[stage][who][name], abs=1e-5)
                values = [s[name] for s in scores.values()]
                assert by_batch["spread"][stage][who][name] == pytest.approx(max(values) - min(values))
    report = format_report(metrics)
    assert "per-batch PCA" in report and "per phase" in report and "exprae [S]" in report
    contract = json.loads((phase_run / "data_contract.json").read_text())
    assert contract["batch_categories"] == {"phase": ["G1", "G2M", "S"]}


def test_covariate_encoding_survives_save_and_load(phase_run, pbmc):
    model = exprae.load(phase_run, device="cpu")
    assert model.batch_categories == {"phase": ["G1", "G2M", "S"]}
    a = exprae.embed(model, pbmc.copy())
    # Categories in another order in the new data: the codes come from the saved levels, not the data's order.
    shuffled = pbmc.copy()
    shuffled.obs["phase"] = shuffled.obs["phase"].cat.reorder_categories(["S", "G2M", "G1"])
    b = exprae.embed(model, shuffled)
    np.testing.assert_array_equal(a.obsm["X_exprae"], b.obsm["X_exprae"])
    # Every cell relabelled as one phase changes its reconstruction: the covariate reaches the network.
    relabelled = pbmc.copy()
    relabelled.obs["phase"] = "S"
    c = exprae.embed(model, relabelled)
    assert not np.allclose(a.layers["exprae_recon"], c.layers["exprae_recon"])


def test_transform_batch_decodes_every_cell_as_from_one_batch(phase_run, pbmc):
    model = exprae.load(phase_run, device="cpu")
    own = exprae.embed(model, pbmc.copy())
    as_s = exprae.embed(model, pbmc.copy(), transform_batch="S")
    assert as_s.uns["exprae"]["transform_batch"] == "S"
    # Same latent and the same scores (they are of the cell's own reconstruction); another reconstruction.
    np.testing.assert_array_equal(own.obsm["X_exprae"], as_s.obsm["X_exprae"])
    np.testing.assert_array_equal(own.obs["exprae_cosine"], as_s.obs["exprae_cosine"])
    is_s = (pbmc.obs["phase"] == "S").to_numpy()
    np.testing.assert_allclose(as_s.layers["exprae_recon"][is_s], own.layers["exprae_recon"][is_s], atol=1e-6)
    assert not np.allclose(as_s.layers["exprae_recon"][~is_s], own.layers["exprae_recon"][~is_s])
    # The counterfactual of every cell equals its reconstruction when it is labelled S to begin with.
    relabelled = pbmc.copy()
    relabelled.obs["phase"] = "S"
    as_if = model.net(
        torch.from_numpy(model.transform(pbmc).X),
        torch.from_numpy(np.array(pd.Categorical(pbmc.obs["phase"], categories=["G1", "G2M", "S"]).codes))[
            :, None
        ].long(),
        decode_batch_nk=torch.full((pbmc.n_obs, 1), 2),
    )["recon"]
    np.testing.assert_allclose(as_s.layers["exprae_recon"], as_if.detach().numpy(), atol=1e-5)


def test_unknown_levels_and_missing_columns_are_clear_errors(phase_run, pbmc):
    model = exprae.load(phase_run, device="cpu")
    with pytest.raises(ConfigError, match=r"known levels: \['G1', 'G2M', 'S'\]"):
        exprae.embed(model, pbmc.copy(), transform_batch="M")
    odd = pbmc.copy()
    odd.obs["phase"] = odd.obs["phase"].cat.add_categories("M")
    odd.obs.iloc[0, odd.obs.columns.get_loc("phase")] = "M"
    with pytest.raises(DataError, match=r"\['M'\].*known levels: \['G1', 'G2M', 'S'\]"):
        exprae.embed(model, odd)
    with pytest.raises(MissingKeyError, match=r"'phase'"):
        exprae.embed(model, ad.AnnData(X=pbmc.X, var=pbmc.var))


def test_predict_with_transform_batch(phase_run, pbmc, tmp_path, capsys):
    data = tmp_path / "new.h5ad"
    pbmc.write_h5ad(data)
    out = tmp_path / "out.h5ad"
    code = predict.main([f"ckpt={phase_run}", f"data.path={data}", f"out={out}", "transform_batch=G1"])
    assert code == 0, capsys.readouterr().err
    written = ad.read_h5ad(out)
    assert written.uns["exprae"]["transform_batch"] == "G1"
    direct = exprae.embed(exprae.load(phase_run, device="cpu"), pbmc.copy(), transform_batch="G1")
    np.testing.assert_allclose(written.layers["exprae_recon"], direct.layers["exprae_recon"], atol=1e-6)
    bad = tmp_path / "bad.h5ad"
    assert predict.main([f"ckpt={phase_run}", f"data.path={data}", f"out={bad}", "transform_batch=M"]) == 1
    assert "known levels" in capsys.readouterr().err and not bad.exists()


def test_nan_in_the_batch_column_stops_training_before_anything_is_written(compose_cfg, pbmc, tmp_path):
    adata = pbmc.copy()
    adata.obs["sample"] = pd.Categorical(np.where(np.arange(adata.n_obs) == 5, None, "a"))
    path = tmp_path / "nan.h5ad"
    adata.write_h5ad(path)
    cfg = compose_cfg(
        "data=h5ad",
        f"data.path={path}",
        "data.preprocess.normalize_total=null",
        "data.preprocess.log1p=false",
        "data.preprocess.n_top_genes=null",
        "data.batch_key=sample",
    )
    from exprae.train import train

    with pytest.raises(DataError, match=r"'sample'.*1 missing values"):
        train(cfg)
    assert not (tmp_path / "run" / "data_contract.json").exists()
