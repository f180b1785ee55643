"""Auxiliary latent losses in training, and the latent kNN label accuracy that scores them."""

from __future__ import annotations

import math

import hydra
import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from exprae.scoring.metrics import knn_label_accuracy
from exprae.train import build, train

# ------------------------------------------------------------------ the metric

# Two tight clusters at 0° and 90°, plus one cell at 0° that carries the other cluster's label.
Z_CLUSTERS = torch.tensor(
    [[1.0, 0.0], [1.0, 0.1], [1.0, -0.1], [0.0, 1.0], [0.1, 1.0], [-0.1, 1.0], [1.0, 0.05]], dtype=torch.float64
)
LABELS_CLUSTERS = torch.tensor([0, 0, 0, 1, 1, 1, 1])


def test_knn_accuracy_by_hand():
    # Leave-one-out, k = 3: every cell's 3 nearest others outvote it correctly except the mislabelled one.
    assert knn_label_accuracy(Z_CLUSTERS, LABELS_CLUSTERS, k=3).item() == pytest.approx(6 / 7)
    assert knn_label_accuracy(Z_CLUSTERS[:6], LABELS_CLUSTERS[:6], k=2).item() == 1.0


def test_knn_ties_go_to_the_more_similar_label():
    # k = 2: the first two cells each see one neighbour of either label, and the nearer one (label 1) decides;
    # the third sees two label-1 cells. Ties broken by label order would score 0 of 3.
    z = torch.tensor([[1.0, 0.2], [1.0, 0.0], [0.0, 1.0]])
    assert knn_label_accuracy(z, torch.tensor([1, 1, 0]), k=2).item() == pytest.approx(2 / 3)


def test_knn_ignores_unlabelled_cells_and_handles_edge_cases():
    z = torch.cat([Z_CLUSTERS, torch.tensor([[0.0, -1.0]], dtype=torch.float64)])
    labels = torch.cat([LABELS_CLUSTERS, torch.tensor([-1])])
    assert knn_label_accuracy(z, labels, k=3) == knn_label_accuracy(Z_CLUSTERS, LABELS_CLUSTERS, k=3)
    assert knn_label_accuracy(Z_CLUSTERS, LABELS_CLUSTERS, k=100).item() == pytest.approx(3 / 7)  # k clipped to 6
    assert math.isnan(knn_label_accuracy(z[:1], labels[:1]).item())
    assert math.isnan(knn_label_accuracy(z, torch.full((8,), -1)).item())
    with pytest.raises(ValueError, match="k must be"):
        knn_label_accuracy(z, labels, k=0)


def test_knn_matches_sklearn_and_does_not_depend_on_chunking():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(2, 8, generator=g)
    labels_n = torch.randint(0, 2, (300,), generator=g)
    z_nk = centers[labels_n] + 1.5 * torch.randn(300, 8, generator=g)
    ours = knn_label_accuracy(z_nk, labels_n, k=15)  # 2 labels and odd k: no ties
    # sklearn's kneighbors() without a query leaves each cell out of its own neighbours, as ours does.
    idx_nk = NearestNeighbors(n_neighbors=15, metric="cosine", algorithm="brute").fit(z_nk.numpy()).kneighbors()[1]
    majority_n = (labels_n.numpy()[idx_nk].mean(axis=1) > 0.5).astype(int)
    assert ours.item() == pytest.approx(float(np.mean(majority_n == labels_n.numpy())))
    assert knn_label_accuracy(z_nk, labels_n, k=15, chunk_size=7).item() == ours.item()


# ------------------------------------------------------------------ wiring into training


def _fit_one_batch(compose_cfg, *overrides: str):
    cfg = compose_cfg(*overrides, "trainer.fast_dev_run=true", "callbacks=none", "logger=none")
    datamodule, module = build(cfg)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[], logger=False)
    trainer.fit(module, datamodule=datamodule)
    return cfg, trainer.callback_metrics


@pytest.mark.parametrize("aux", ["triplet_cosine", "pair_cosine"])
def test_aux_term_is_added_and_logged(compose_cfg, aux):
    cfg, logged = _fit_one_batch(compose_cfg, f"aux={aux}", "aux.label_key=bulk_labels", "aux.weight=0.5")
    assert cfg.data.label_key == "bulk_labels"
    recon, aux_value, total = (logged[k].item() for k in ("train/recon", "train/aux", "train/loss_epoch"))
    assert aux_value > 0 and total == pytest.approx(recon + 0.5 * aux_value, rel=1e-5)
    assert 0.0 <= logged["val/knn_accuracy"].item() <= 1.0


def test_no_aux_logs_no_aux_terms_but_scores_labels_when_given(compose_cfg):
    _, logged = _fit_one_batch(compose_cfg)
    assert not {"train/aux", "train/recon", "val/knn_accuracy"} & set(logged)
    cfg = compose_cfg("aux.label_key=bulk_labels", "trainer.fast_dev_run=true", "callbacks=none", "logger=none")
    metrics = train(cfg)
    assert "train/aux" not in metrics and 0 <= metrics["test"]["model"]["knn_accuracy"] <= 1


def test_aux_without_labels_is_refused_before_training(compose_cfg):
    cfg = compose_cfg("aux=triplet_cosine")  # aux.label_key left at ???
    with pytest.raises(ValueError, match=r"aux\.label_key"):
        build(cfg)


@pytest.mark.slow
def test_triplet_aux_term_improves_latent_knn_accuracy_on_pbmc68k(compose_cfg):
    """Same seed, data, split and epochs; only the auxiliary triplet term differs."""
    common = [
        "seed=0",
        "data.layer=raw",  # log-normalised expression
        "trainer.max_epochs=20",
        "optimizer.lr=1e-3",  # the measured setting in docs/losses.md; at the default 3e-4 the gain is smaller
        "callbacks=none",  # score the final epoch of both runs, not a checkpoint picked by reconstruction loss
        "logger=none",
        "module.baselines=false",
        "data.val_fraction=0.3",
        "data.test_fraction=0.3",
        "data.stratify_key=bulk_labels",
        "aux.label_key=bulk_labels",
    ]
    plain = train(compose_cfg(*common, "aux=none"))
    with_aux = train(compose_cfg(*common, "aux=triplet_cosine", "aux.weight=1.0"))
    gains = []
    for stage in ("val", "test"):  # 210 held-out cells each
        before, after = plain[stage]["model"]["knn_accuracy"], with_aux[stage]["model"]["knn_accuracy"]
        print(f"{stage}/knn_accuracy: without aux {before:.3f}, with triplet aux {after:.3f}")
        assert after > before, (stage, before, after)
        gains.append(after - before)
    # Measured mean gain +0.0375 at seed 0 (+0.033 val, +0.042 test) and +0.031 at seed 1 (docs/losses.md). The
    # runs without the term move by 0.005 (test) to 0.009 (val) between seeds 0 and 1: 0.02 is over twice that
    # noise and below both measured gains (the old 0.03 sat on seed 1's gain).
    assert sum(gains) / 2 >= 0.02, gains
    # The latent term does not cost reconstruction quality.
    assert with_aux["val"]["model"]["cosine"] >= plain["val"]["model"]["cosine"] - 0.01


def test_aux_term_runs_in_graph_mode_on_cpu(compose_cfg):
    """Graph mode's manual-optimization step carries the aux term; on CPU it runs eagerly (CUDA: the gpu test)."""
    overrides = ["aux=triplet_cosine", "aux.label_key=bulk_labels", "module.compile=graph", "trainer.fast_dev_run=true"]
    metrics = train(compose_cfg(*overrides, "callbacks=none", "logger=none"))
    assert 0.0 <= metrics["val"]["model"]["knn_accuracy"] <= 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_aux_term_inside_a_captured_cuda_graph(compose_cfg):
    common = ["trainer=gpu", "aux=triplet_cosine", "aux.label_key=bulk_labels", "callbacks=none", "logger=none"]
    common += ["trainer.max_epochs=3", "data.batch_size=64", "model.dropout=0"]
    graphed = train(compose_cfg(*common, "module.compile=graph"))
    eager = train(compose_cfg(*common, "module.compile=none"))
    assert graphed["val"]["model"]["loss"] == pytest.approx(eager["val"]["model"]["loss"], rel=2e-2)
    assert graphed["val"]["model"]["knn_accuracy"] == pytest.approx(eager["val"]["model"]["knn_accuracy"], abs=0.05)
