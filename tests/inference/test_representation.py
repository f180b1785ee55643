"""New data in another representation than the training data is flagged by embed and refused by predict."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest

import exprae
from exprae import predict
from exprae.inference.representation import WARN


@pytest.fixture(scope="module")
def model(pbmc_run):
    return exprae.load(pbmc_run, device="cpu")


def _counts_like(pbmc: ad.AnnData) -> ad.AnnData:
    """pbmc68k's cells and genes with integer counts in X (what a user passes by mistake to a scaled model)."""
    counts = pbmc.copy()
    counts.X = np.random.default_rng(0).poisson(np.expm1(np.clip(pbmc.raw[:, pbmc.var_names].X.toarray(), 0, 6)))
    counts.X = counts.X.astype(np.float32)
    return counts


def test_the_training_representation_passes_quietly(model, pbmc):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any representation warning would fail here
        adata = exprae.embed(model, pbmc, copy=True)
    found = adata.uns["exprae"]["representation"]
    assert found["findings"] == [] and found["shift"] < WARN and found["spread"] < WARN


def test_counts_given_to_a_scaled_model_are_flagged(model, pbmc):
    with pytest.warns(UserWarning, match="raw counts\\?"):
        adata = exprae.embed(model, _counts_like(pbmc), copy=True)
    assert any(
        f.startswith("the input holds non-negative integers") for f in adata.uns["exprae"]["representation"]["findings"]
    )


def test_predict_refuses_counts_for_a_scaled_model_unless_told(pbmc_run, pbmc, tmp_path, capsys):
    path = tmp_path / "counts.h5ad"
    _counts_like(pbmc).write_h5ad(path)
    out = tmp_path / "out.h5ad"
    args = [f"ckpt={pbmc_run}", f"data.path={path}", f"out={out}"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert predict.main(args) == 1
    err = capsys.readouterr().err
    assert "does not look like the representation the model" in err and "check_representation=false" in err
    # The refusal says it all: no warning repeating it first.
    assert not [w for w in seen if "representation the model was trained on" in str(w.message)]
    assert not out.exists()
    with pytest.warns(UserWarning, match="may not be in the representation") as told:
        assert predict.main([*args, "check_representation=false"]) == 0
    assert out.exists()
    # The command-line format: one line, no source path or code line.
    line = warnings.formatwarning(told[0].message, told[0].category, told[0].filename, told[0].lineno)
    assert line.startswith("UserWarning: these cells may not be") and ".py:" not in line, line


def test_real_raw_counts_are_refused_by_a_scaled_model(pbmc_run, realdata, tmp_path, capsys):
    """pbmc4k's raw 10x counts against the scaled-pbmc68k model: the issue's 'cosine 0.31' case."""
    counts = ad.read_h5ad(realdata("pbmc4k_soupx.h5ad"))
    counts.var_names_make_unique()
    path = tmp_path / "pbmc4k.h5ad"
    counts.write_h5ad(path)
    out = tmp_path / "out.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # allow_missing_genes warns about the zero-filled genes
        code = predict.main([f"ckpt={pbmc_run}", f"data.path={path}", f"out={out}", "allow_missing_genes=true"])
    assert code == 1 and not out.exists()
    assert "raw counts?" in capsys.readouterr().err
