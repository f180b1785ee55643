"""Per-gene, marker and latent evaluations against scikit-learn and hand cases; on pbmc68k and pbmc4k."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from sklearn.metrics import adjusted_rand_score, silhouette_score

from exprae.scoring.heldout_quality import (
    cluster_agreement,
    knn_graph_preservation,
    latent_quality,
    marker_preservation,
    per_gene_correlation,
)


def test_per_gene_correlation_matches_numpy():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(50, 6))
    pred = target + rng.normal(size=(50, 6)) * np.arange(6)
    pred[:, 5] = 1.0  # a constant prediction has no correlation
    r = per_gene_correlation(pred, target)
    for g in range(5):
        assert r[g] == pytest.approx(np.corrcoef(pred[:, g], target[:, g])[0, 1])
    assert np.isnan(r[5]) and r[0] == pytest.approx(1.0)


def test_marker_preservation_hand_cases():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 20)
    x = rng.normal(size=(60, 30))
    for t in range(3):
        x[labels == t, 10 * t : 10 * t + 3] += 5.0  # three clear markers per type
    assert marker_preservation(x, x, labels, n_markers=3) == 1.0
    shuffled = x[:, rng.permutation(30)]
    assert marker_preservation(x, shuffled, labels, n_markers=3) < 0.3  # measured 0.07; chance is 3 / 30 = 0.1


def test_knn_graph_preservation_hand_cases():
    x = np.random.default_rng(0).normal(size=(80, 10))
    assert knn_graph_preservation(x, x, k=5) == 1.0
    assert knn_graph_preservation(x, 3.0 * x + 1.0, k=5) == 1.0  # distances scale, neighbours do not change
    unrelated = np.random.default_rng(1).normal(size=(80, 10))
    assert knn_graph_preservation(x, unrelated, k=5) < 0.25  # chance is k / (n - 1) = 0.06


def test_cluster_and_label_scores_agree_with_sklearn():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 30)
    z = rng.normal(size=(90, 4)) * 0.1 + np.eye(4)[labels] * 5.0
    assert cluster_agreement(z, labels) == {"ari": 1.0, "nmi": 1.0}
    scores = latent_quality(z, z, labels, k=5)
    assert scores["silhouette"] == pytest.approx(silhouette_score(z, labels))
    assert scores["knn_accuracy"] == 1.0
    # Labels unrelated to the structure: ARI near 0, as sklearn scores the same clusters against them.
    noise = rng.permutation(labels)
    got = cluster_agreement(z, noise)
    assert got["ari"] == pytest.approx(adjusted_rand_score(noise, labels), abs=1e-12) and abs(got["ari"]) < 0.1
    assert "ari" not in latent_quality(z, z, None, k=5)


@pytest.mark.slow  # reading and normalising 33,694 genes takes a while on a loaded 2-core machine
def test_latent_quality_of_pca_on_pbmc4k(realdata):
    """Real counts: the PCA latent separates the five annotated PBMC types (cell_type from the SoupX authors)."""
    adata = ad.read_h5ad(realdata("pbmc4k_soupx.h5ad"))
    adata = adata[adata.obs["cell_type"] != "?"].copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=500, subset=True)
    x = adata.X.toarray()
    x = x - x.mean(0)
    z = x @ np.linalg.svd(x, full_matrices=False)[2][:16].T
    labels = pd.Categorical(adata.obs["cell_type"]).codes
    scores = latent_quality(z, x, labels, k=15)
    assert scores["knn_accuracy"] > 0.8 and scores["nmi"] > 0.4 and scores["knn_graph_preservation"] > 0.2
    shuffled = latent_quality(z, x, np.random.default_rng(0).permutation(labels), k=15)
    assert shuffled["nmi"] < 0.05 and shuffled["knn_accuracy"] < 0.5
