"""Count-likelihood runs (``loss=nb``) load, embed and predict through the module's own ``predict_step``."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

import exprae
from conftest import train_run
from exprae import predict
from exprae.data.datasets import load_builtin
from exprae.train import build

SYNTH = {"n_cells": 240, "n_genes": 120}
DATA = [
    "data=synthetic",
    *(f"data.synthetic.{k}={v}" for k, v in SYNTH.items()),
    "data.batch_size=32",
    "data.preprocess.scale=true",  # the input view must replay scaling too, not only normalize + log1p
]

pytestmark = pytest.mark.slow  # each test trains (or reuses) a real NB run


@pytest.fixture(scope="module")
def nb_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch NB run on seeded synthetic counts (normalise, log1p, scale), trained once for this module."""
    out = tmp_path_factory.mktemp("nb") / "run"
    return train_run(out, "loss=nb", *DATA, "trainer.max_epochs=2", "model.latent_dim=4", "logger=none")


@pytest.fixture(scope="module")
def counts() -> ad.AnnData:
    return load_builtin("synthetic", **SYNTH)


def test_nb_run_loads_as_the_trained_module(nb_run):
    model = exprae.load(nb_run, device="cpu")
    assert model.count_model and model.needs_library and model.loss == "NegativeBinomialNLL"
    ckpt = torch.load(nb_run / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    # Every trained tensor is in the loaded module, the count head and the input view included.
    loaded = model.module.state_dict()
    assert set(ckpt) == set(loaded)
    assert any(k.startswith("net.count_head.") for k in ckpt) and any(k.startswith("input_view.") for k in ckpt)
    for key, value in ckpt.items():
        torch.testing.assert_close(loaded[key], value, msg=key)


def test_embed_equals_predict_step_on_the_datamodules_batches(nb_run, counts, compose_cfg):
    """embed rebuilds library sizes and size factors from the AnnData exactly as the datamodule made them."""
    model = exprae.load(nb_run, device="cpu")
    adata = exprae.embed(model, counts, copy=True, batch_size=50)
    assert adata.uns["exprae"]["keys"]["expected_counts"] == "layers/exprae_expected_counts"

    datamodule, _ = build(compose_cfg("loss=nb", *DATA))
    assert datamodule.var_names == model.var_names
    rows = datamodule.splits["test"]
    with torch.inference_mode():
        outs = [model.module.predict_step(b, i) for i, b in enumerate(datamodule.test_dataloader())]
    recon = torch.cat([o["recon"] for o in outs]).numpy()
    expected = torch.cat([o["expected_counts"] for o in outs]).numpy()
    mine = adata[rows, model.var_names]
    np.testing.assert_allclose(mine.layers["exprae_recon"], recon, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mine.layers["exprae_expected_counts"], expected, rtol=1e-4, atol=1e-3)
    # Expected counts are counts: per cell they sum to about the observed library over the model's genes.
    library = np.asarray(counts[rows, model.var_names].X.sum(axis=1)).ravel()
    np.testing.assert_allclose(mine.layers["exprae_expected_counts"].sum(axis=1), library, rtol=1e-3)
    # Scored against the input in its own (scaled log-normalised) representation, as training scored the
    # same test cells: the mean per-cell cosine is the run's test/cosine.
    metrics = json.loads((nb_run / "metrics.json").read_text())
    assert adata.obs["exprae_cosine"].iloc[rows].mean() == pytest.approx(metrics["test"]["model"]["cosine"], abs=1e-4)


def test_exprae_predict_writes_expected_counts(nb_run, counts, tmp_path, capsys):
    path, out = tmp_path / "cells.h5ad", tmp_path / "cells_ae.h5ad"
    counts.write_h5ad(path)
    assert predict.main([f"ckpt={nb_run}", f"data.path={path}", f"out={out}", "device=cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"{counts.n_obs} cells embedded" in printed and "exprae_expected_counts" in printed
    written = ad.read_h5ad(out)
    assert written.layers["exprae_expected_counts"].shape == counts.shape
    assert np.isfinite(written.layers["exprae_expected_counts"]).all()
    assert written.obsm["X_exprae"].shape == (counts.n_obs, 4)
