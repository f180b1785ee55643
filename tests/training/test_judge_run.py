"""A run scored against the reviewer's baselines, with its gain in equivalent PCA components."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from exprae.errors import ConfigError
from exprae.runs import rundir
from exprae.train import build, format_report, train

ALL = "module.baselines=[mean,pca,spherical_pca,knn,centroid]"


def test_run_scores_every_baseline_and_its_gain_over_pca(compose_cfg):
    cfg = compose_cfg(ALL, "data.label_key=bulk_labels", "trainer.max_epochs=1", "model.latent_dim=8", "logger=none")
    metrics = train(cfg)
    saved = json.loads((Path(cfg.paths.output_dir) / rundir.METRICS_FILE).read_text())
    for stage in ("val", "test"):
        assert set(saved[stage]) == {"model", "mean", "pca", "spherical_pca", "knn", "centroid"}
        assert all(math.isfinite(saved[stage][who]["cosine"]) for who in saved[stage])
    gain = saved["gain_over_pca"]
    curve = gain["pca_cosine_by_components"]
    # Two code paths agree: the closed-form PCA-k curve and the PCA baseline scored batch by batch.
    assert curve[8] == pytest.approx(saved["val"]["pca"]["cosine"], abs=1e-5)
    assert curve[0] == pytest.approx(saved["val"]["mean"]["cosine"], abs=1e-5)
    assert gain["max_components"] == 32 and len(curve) == 33
    k = gain["components"]
    assert k is not None and np.interp(k, np.arange(33), curve) == pytest.approx(
        saved["val"]["model"]["cosine"], abs=1e-4
    )
    assert gain["relative_weight_change"] > 0
    assert saved["knn_smoothing_k"] == 15
    quality = saved["heldout_quality"]
    assert quality["stage"] == "test" and quality["n_cells"] == saved["n_cells"]["test"]
    # The same leave-one-out kNN accuracy on the same test latents as the one logged during testing.
    assert quality["model"]["knn_accuracy"] == pytest.approx(saved["test"]["model"]["knn_accuracy"], abs=1e-6)
    for who in ("model", "pca"):
        assert {"gene_r_median", "marker_overlap", "ari", "nmi", "silhouette", "knn_graph_preservation"} <= set(
            quality[who]
        )
    table = format_report(metrics)
    assert "spherical PCA (8)" in table and "kNN smoothing (k=15)" in table and "cell-type centroid" in table
    assert "is worth PCA-" in table


def test_knn_baseline_only_holds_training_cells(compose_cfg):
    datamodule, module = build(compose_cfg("module.baselines=[knn]", "model.latent_dim=8"))
    module.prepare_start()  # build() handed it the training data
    held = np.asarray(datamodule.adata.X[datamodule.splits["val"]])
    train_x = module.extra_baselines.parts["knn"].train_x_mg.numpy()
    assert len(train_x) == len(datamodule.splits["train"])
    # No held-out cell is among the candidates, so none can be its own neighbour.
    assert not any((np.abs(train_x - cell).max(1) == 0).any() for cell in held)


def test_centroid_without_labels_fails_before_anything_is_written(compose_cfg):
    cfg = compose_cfg("module.baselines=[centroid]")
    with pytest.raises(ConfigError, match=r"data\.label_key"):
        train(cfg)
    assert not Path(cfg.paths.output_dir).exists()


def test_unknown_baseline_name_is_a_config_error(compose_cfg):
    with pytest.raises(ConfigError, match="spherical_pca"):
        train(compose_cfg("module.baselines=[mean,spherical]"))
