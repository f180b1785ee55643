"""The MCV study scripts: scVI side by side (optional scvi-tools) and MCV against the synthetic truth."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from exprae.data.datasets import synthetic_counts

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
ENV = {**os.environ, "PYTHONPATH": str(SCRIPTS.parent / "src")}


def test_scvi_script_says_how_to_install_scvi_tools_when_absent(tmp_path):
    # Hide scvi (installed or not) the way an environment without it looks: find_spec returns None.
    code = (
        "import importlib.util, runpy, sys; find = importlib.util.find_spec; "
        "importlib.util.find_spec = lambda name, *a: None if name == 'scvi' else find(name, *a); "
        f"sys.argv = ['scvi_side_by_side.py', 'x.h5ad', '--out', {str(tmp_path / 'o')!r}]; "
        f"runpy.run_path({str(SCRIPTS / 'scvi_side_by_side.py')!r}, run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert (
        "scvi-tools is not installed" in done.stderr and 'pip install "scvi-tools>=1.1" "torch==2.13.0"' in done.stderr
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("scvi") is None, reason="scvi-tools is an optional extra (bench)")
def test_scvi_side_by_side_on_small_counts(tmp_path):
    adata = synthetic_counts(400, 200, n_types=4, store_truth=False, seed=0)
    path = tmp_path / "counts.h5ad"
    adata.write_h5ad(path)
    cmd = [sys.executable, str(SCRIPTS / "scvi_side_by_side.py"), str(path), "--latent", "4", "--max-epochs", "3"]
    cmd += ["--out", str(tmp_path / "out"), "--n-samples", "4", "data.preprocess.n_top_genes=100"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert result["n_genes"] == 100 and result["n_cells"]["test"] == 40
    for who in ("scvi", "pca", "mean"):
        assert {"mcv_mse", "mcv_cosine", "mcv_poisson", "cosine", "mse"} <= set(result["test"][who])
    assert result["test"]["pca"]["mcv_mse"] < result["test"]["mean"]["mcv_mse"]
    # Per-cell scores in an exprae run's layout, whose means are the reported ones: pairable cell by cell.
    cells = pd.read_csv(tmp_path / "out" / "cells.csv")
    assert cells.groupby("split").size().to_dict() == {"val": 40, "test": 40}
    assert cells["obs_name"].is_unique and set(cells["obs_name"]) <= set(adata.obs_names)
    test = cells[cells["split"] == "test"]
    for column, (who, name) in {"mcv_mse": ("scvi", "mcv_mse"), "pca_mcv_mse": ("pca", "mcv_mse")}.items():
        assert test[column].mean() == pytest.approx(result["test"][who][name], rel=1e-4)
    assert test["meanprofile_cosine"].mean() == pytest.approx(result["test"]["mean"]["cosine"], rel=1e-4)


@pytest.mark.slow
def test_mcv_ranks_like_the_truth_on_a_reduced_grid(tmp_path):
    """Too small, right and too large latent sizes of PCA and a trained model: MCV orders them as the truth does."""
    cmd = [sys.executable, str(SCRIPTS / "mcv_vs_truth.py"), "--out", str(tmp_path / "o"), "--latents", "1", "6", "60"]
    cmd += ["--losses", "mse", "--cells", "500", "--genes", "150", "--epochs", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(tmp_path / "o" / "results.csv")
    assert len(table) == 6
    # Both ranks agree on which size is best for each method, and the too-large PCA is worse than the right one.
    for _, rows in table.groupby("method"):
        assert rows.loc[rows.mcv_mse.idxmin(), "latent_dim"] == rows.loc[rows.mse_to_truth.idxmin(), "latent_dim"]
    assert "Spearman rho" in (tmp_path / "o" / "summary.md").read_text()
