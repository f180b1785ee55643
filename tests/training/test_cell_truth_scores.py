"""cells.csv holds each held-out cell's scores against the synthetic truths, the values behind the logged means."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from exprae.constants import RATE_TRUTH_KEY, TRUTH_KEY
from exprae.train import build, train

SMALL = ["data=synthetic", "model.latent_dim=4", "model.hidden_dims=[32]", "logger=none", "trainer.max_epochs=2"]
SMALL += ["data.synthetic.n_cells=300", "data.synthetic.n_genes=60", "data.batch_size=50"]


@pytest.mark.parametrize("loss", ["mse", "nb"])
def test_per_cell_truth_scores_average_to_the_logged_ones(compose_cfg, loss):
    """Every method's per-cell scores against each truth; a count model's from its sampled expectation."""
    cfg = compose_cfg(*SMALL, f"loss={loss}", "module.baselines=[mean,pca,knn]")
    metrics = train(cfg)
    cells = pd.read_csv(Path(cfg.paths.output_dir) / "cells.csv")
    for stage in ("val", "test"):
        rows = cells[cells["split"] == stage]
        for who, prefix in (("model", ""), ("pca", "pca_"), ("mean", "meanprofile_"), ("knn", "knn_")):
            for truth in ("truth", "expected_truth", "rate_truth"):
                for name in ("mse", "cosine", "pearson"):
                    column = f"{prefix}{name}_to_{truth}"
                    expected = metrics[stage][who][f"{name}_to_{truth}"]
                    assert rows[column].mean() == pytest.approx(expected, rel=1e-4), (stage, column)
    # By hand for the mean profile: its per-cell MSE to the rate truth and to T(E[x]), cell by cell.
    datamodule, _ = build(cfg)
    mean_g = datamodule.split_dataset("train").x.toarray().mean(axis=0)
    test = datamodule.splits["test"]
    names = np.asarray(datamodule.adata.obs_names)[test]
    rows = cells[cells["split"] == "test"].set_index("obs_name").loc[names]
    for layer, column in ((RATE_TRUTH_KEY, "meanprofile_mse_to_rate_truth"), (TRUTH_KEY, "meanprofile_mse_to_truth")):
        truth_ng = np.asarray(datamodule.adata.layers[layer][test])
        np.testing.assert_allclose(rows[column], ((mean_g - truth_ng) ** 2).mean(axis=1), rtol=1e-4)


def test_data_without_a_truth_gets_no_truth_columns(compose_cfg):
    cfg = compose_cfg("model.latent_dim=4", "model.hidden_dims=[32]", "logger=none", "trainer.max_epochs=1")
    train(cfg)
    cells = pd.read_csv(Path(cfg.paths.output_dir) / "cells.csv")
    assert not [c for c in cells.columns if "truth" in c]
    assert {"mse", "pca_mse"} <= set(cells.columns)
