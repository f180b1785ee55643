"""The datamodule on dense, sparse, layer and raw inputs; splits; preprocessing fitted on training cells."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from exprae.constants import INDEX_KEY, TARGET_KEY, TRUTH_KEY, X_KEY
from exprae.data import CellBatchSampler, ExpressionDataModule, split_cells
from exprae.data.datasets import synthetic_counts
from exprae.data.preprocessing import Preprocessing


def _module(path, **kw) -> ExpressionDataModule:
    dm = ExpressionDataModule(dataset=None, path=str(path), batch_size=32, **kw)
    dm.setup("fit")
    return dm


def _all_train_rows(dm: ExpressionDataModule) -> torch.Tensor:
    return torch.cat([b[X_KEY] for b in dm.train_dataloader()])


@pytest.fixture
def pbmc_file(pbmc, tmp_path):
    adata = pbmc.copy()
    adata.layers["counts_like"] = sp.csr_matrix(np.expm1(adata.raw[:, adata.var_names].X.toarray()))
    path = tmp_path / "pbmc.h5ad"
    adata.write_h5ad(path)
    return path


def test_dense_X_and_sparse_layer_give_the_same_batches(pbmc, tmp_path):
    dense, sparse = pbmc.copy(), pbmc.copy()
    sparse.X = sp.csr_matrix(sparse.X)
    dense.write_h5ad(tmp_path / "dense.h5ad")
    sparse.write_h5ad(tmp_path / "sparse.h5ad")
    a, b = _module(tmp_path / "dense.h5ad"), _module(tmp_path / "sparse.h5ad")
    assert sp.issparse(b.adata.X)  # kept sparse until a batch is made
    torch.testing.assert_close(_all_train_rows(a), _all_train_rows(b))


def test_layer_and_raw_are_selected(pbmc_file, pbmc):
    layer = _module(pbmc_file, layer="counts_like", preprocess=Preprocessing(normalize_total=1e4, log1p=True))
    assert layer.n_genes == pbmc.n_vars and sp.issparse(layer.adata.X)
    assert (layer.adata.X.data >= 0).all()
    raw = _module(pbmc_file, layer="raw")
    assert raw.n_genes == pbmc.raw.n_vars
    batch = next(iter(raw.val_dataloader()))
    rows = batch[INDEX_KEY].numpy()
    expected = pbmc.raw.X[raw.splits["val"][rows]].toarray()
    np.testing.assert_allclose(batch[X_KEY].numpy(), expected, rtol=1e-6)
    assert batch[TARGET_KEY] is batch[X_KEY]


def test_missing_layer_lists_the_layers(pbmc_file):
    with pytest.raises(KeyError, match=r"layer 'counts' not found; available layers: \['counts_like'\]"):
        _module(pbmc_file, layer="counts")


def test_split_is_reproducible_and_disjoint():
    a = split_cells(700, val_fraction=0.1, test_fraction=0.1, seed=3)
    b = split_cells(700, val_fraction=0.1, test_fraction=0.1, seed=3)
    c = split_cells(700, val_fraction=0.1, test_fraction=0.1, seed=4)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["val"], c["val"])
    everything = np.concatenate(list(a.values()))
    assert len(everything) == 700 and len(np.unique(everything)) == 700


def test_stratified_split_keeps_label_proportions(pbmc):
    labels = pbmc.obs["bulk_labels"].to_numpy()
    split = split_cells(len(labels), val_fraction=0.2, test_fraction=0.2, seed=0, stratify=labels)
    overall = pbmc.obs["bulk_labels"].value_counts(normalize=True)
    val = pbmc.obs["bulk_labels"].iloc[split["val"]].value_counts(normalize=True)
    # Stratified: each label's validation count is within one cell of its share of 140 cells, so its proportion
    # is within 1 / 140 of the overall one (measured 0.004; unstratified draws miss by 0.029 to 0.071 over split
    # seeds 0-5, so the old bound of 0.03 let seed 2 pass without stratification).
    assert (val.reindex(overall.index).fillna(0) - overall).abs().max() <= 1 / len(split["val"]) + 1e-12


def test_sampler_covers_each_cell_once_per_epoch_and_shards_disjointly():
    shards = [list(CellBatchSampler(103, 10, shuffle=True, seed=1, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1])
    rows = np.concatenate([np.concatenate(s) for s in shards])
    assert set(rows) == set(range(103)) and len(rows) == 104  # one cell repeated to equalise the ranks
    sampler = CellBatchSampler(50, 8, shuffle=True, seed=1)
    first = np.concatenate(list(sampler))
    sampler.set_epoch(1)
    second = np.concatenate(list(sampler))
    assert sorted(first) == sorted(second) == list(range(50)) and not np.array_equal(first, second)


def test_scaling_and_hvg_are_fitted_on_training_cells_only(pbmc_file, pbmc):
    pre = Preprocessing(n_top_genes=200, scale=True)
    dm = _module(pbmc_file, layer="raw", preprocess=pre)
    assert dm.n_genes == 200 and len(pre.genes) == 200 and set(pre.genes) <= set(pbmc.raw.var_names)
    train_x = dm.adata.X[dm.splits["train"]]
    np.testing.assert_allclose(train_x.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(train_x.std(0, ddof=1), 1, atol=1e-3)
    # held-out cells are transformed with the training statistics, so they are not exactly centred
    assert np.abs(dm.adata.X[dm.splits["val"]].mean(0)).max() > 1e-3
    clipped = _module(pbmc_file, layer="raw", preprocess=Preprocessing(n_top_genes=200, scale=True, max_value=3))
    assert np.abs(clipped.adata.X).max() == pytest.approx(3)


def test_synthetic_truth_travels_with_the_batches():
    dm = ExpressionDataModule(
        dataset="synthetic",
        synthetic={"n_cells": 300, "n_genes": 50, "seed": 1},
        preprocess=Preprocessing(normalize_total=1e4, log1p=True),
        batch_size=16,
    )
    dm.setup("fit")
    batch = next(iter(dm.test_dataloader()))
    assert batch[TRUTH_KEY].shape == batch[X_KEY].shape == (16, 50)
    assert torch.isfinite(batch[TRUTH_KEY]).all()


def test_synthetic_counts_are_seeded_negative_binomial():
    a, b = synthetic_counts(200, 80, seed=5), synthetic_counts(200, 80, seed=5)
    assert (a.X != b.X).nnz == 0
    counts = a.X.toarray()
    assert np.all(counts == np.round(counts)) and counts.min() >= 0
    lib = counts.sum(1)
    assert lib.std() / lib.mean() > 0.2  # library sizes vary
    assert a.layers["true_mean"].shape == (200, 80) and a.obs["cell_type"].nunique() > 1
