"""The opt-in baselines a methods reviewer asks for: spherical PCA, kNN smoothing, the cell-type centroid."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from exprae.nn.baselines import Baselines, CentroidPredictor, ExtraBaselines, KNNSmoother, SphericalPCA
from exprae.scoring.metrics import per_cell_metrics


@pytest.fixture
def split(pbmc) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Scaled pbmc68k (its first 200 genes, to keep the eigendecompositions quick): 500 training and 200 held-out cells."""
    x = torch.as_tensor(pbmc.X[:, :200], dtype=torch.float32)
    labels = pbmc.obs["bulk_labels"].to_numpy()
    return x[:500], x[500:], labels[:500], labels[500:]


def test_spherical_pca_is_pca_of_unit_cells_rescaled_by_least_squares(split):
    train, held, _, _ = split
    sph = SphericalPCA(train.shape[1], 8).fit(torch.split(train, 128))
    unit = lambda m: m.double().numpy() / np.linalg.norm(m.double().numpy(), axis=1, keepdims=True)  # noqa: E731
    ref = PCA(n_components=8, svd_solver="full").fit(unit(train))
    direction = ref.inverse_transform(ref.transform(unit(held)))
    x = held.double().numpy()
    scale = np.maximum((x * direction).sum(1), 0) / (direction**2).sum(1)
    np.testing.assert_allclose(sph(held).double().numpy(), scale[:, None] * direction, atol=1e-4)
    # The least-squares scale is the best MSE any rescaling of the direction reaches (better than ||x||·û).
    mse_ls = ((sph(held).double().numpy() - x) ** 2).mean(1)
    mse_norm = ((np.linalg.norm(x, axis=1, keepdims=True) * direction - x) ** 2).mean(1)
    assert (mse_ls <= mse_norm + 1e-6).all()


def test_spherical_pca_differs_from_pca_where_norms_vary(split):
    """On cells of very different norms plain PCA is dominated by the large cells; spherical PCA is not."""
    train, held, _, _ = split
    gen = torch.Generator().manual_seed(0)
    scale = torch.exp(2 * torch.randn(len(train), 1, generator=gen))
    base = Baselines(train.shape[1], 8).fit([train * scale])
    sph = SphericalPCA(train.shape[1], 8).fit([train * scale])
    cos_pca = per_cell_metrics(base.pca(held), held)["cosine"].mean()
    cos_sph = per_cell_metrics(sph(held), held)["cosine"].mean()
    assert cos_sph > cos_pca + 0.01


def test_knn_smoother_is_the_mean_of_the_nearest_training_cells_in_pca_space(split):
    train, held, _, _ = split
    base = Baselines(train.shape[1], 10).fit([train])
    knn = KNNSmoother(k=7, chunk_size=64).fit(train, mean_g=base.mean_g, components_kg=base.components_kg)
    z_train = ((train - base.mean_g) @ base.components_kg.T).numpy()
    z_held = ((held - base.mean_g) @ base.components_kg.T).numpy()
    idx = NearestNeighbors(n_neighbors=7, algorithm="brute").fit(z_train).kneighbors(z_held)[1]
    np.testing.assert_allclose(knn(held).numpy(), train.numpy()[idx].mean(1), atol=1e-5)
    with pytest.raises(ValueError, match="k=501"):
        KNNSmoother(k=501).fit(train, mean_g=base.mean_g, components_kg=base.components_kg)


def test_centroid_predicts_the_training_mean_of_each_cells_label(split):
    train, held, y_train, y_held = split
    cats = pd.Categorical(np.concatenate([y_train, y_held])).categories
    code = lambda y: torch.tensor(pd.Categorical(y, categories=cats).codes, dtype=torch.long)  # noqa: E731
    codes_train = code(y_train)
    codes_train[:20] = -1  # unlabelled training cells count towards the mean profile only
    cen = CentroidPredictor().fit(torch.split(train, 100), codes_train)
    frame = pd.DataFrame(train.numpy()[20:]).groupby(np.asarray(y_train[20:])).mean()
    codes_held = code(y_held)
    pred = cen(held, codes_held).numpy()
    for i in range(len(held)):
        np.testing.assert_allclose(pred[i], frame.loc[y_held[i]].to_numpy(), atol=1e-5)
    unlabelled = cen(held[:3], torch.full((3,), -1))
    np.testing.assert_allclose(
        unlabelled.numpy(), np.broadcast_to(train.numpy().mean(0), (3, train.shape[1])), atol=1e-5
    )


def test_extra_baselines_fit_only_what_was_asked_and_persist_nothing(split):
    train, held, _, _ = split
    base = Baselines(train.shape[1], 8).fit([train])
    extra = ExtraBaselines(train.shape[1], 8, ["mean", "pca", "knn"], knn_k=5)
    extra.fit(lambda: torch.split(train, 100), pca=base, labels_n=None)
    assert list(extra(held)) == ["knn"]
    assert extra.state_dict() == {}  # judged per run, never part of a checkpoint a user loads
    with pytest.raises(ValueError, match="label"):
        ExtraBaselines(train.shape[1], 8, ["centroid"]).fit(lambda: [train], pca=base, labels_n=None)


def test_reviewer_baselines_on_pbmc4k_counts(realdata):
    """Real counts, log-normalised on 500 HVGs: kNN and the cell-type centroid beat the mean profile by far."""
    adata = ad.read_h5ad(realdata("pbmc4k_soupx.h5ad"))
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=500, subset=True)
    x = torch.as_tensor(adata.X.toarray(), dtype=torch.float32)
    codes = torch.as_tensor(pd.Categorical(adata.obs["cell_type"]).codes, dtype=torch.long)
    rows = np.random.default_rng(0).permutation(len(x))
    tr, te = rows[:1700], rows[1700:]
    base = Baselines(x.shape[1], 16).fit([x[tr]])
    extra = ExtraBaselines(x.shape[1], 16, ["spherical_pca", "knn", "centroid"])
    extra.fit(lambda: [x[tr]], pca=base, labels_n=codes[tr])
    cos = {who: per_cell_metrics(r, x[te])["cosine"].mean().item() for who, r in base(x[te]).items()}
    cos.update({who: per_cell_metrics(r, x[te])["cosine"].mean().item() for who, r in extra(x[te], codes[te]).items()})
    # Five well-separated PBMC types: knowing a cell's type or its neighbours explains much of its direction.
    assert cos["knn"] > cos["mean"] + 0.05 and cos["centroid"] > cos["mean"] + 0.05
    assert cos["spherical_pca"] > cos["mean"] + 0.05
