"""The molecule split of molecular cross-validation: exact halves, binomial draws, reproducible wherever drawn."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from exprae.constants import MCV_COUNTS_KEY, MCV_TARGET_KEY, X_KEY
from exprae.data import ExpressionDataModule
from exprae.data.datasets import synthetic_counts
from exprae.data.mcv import MoleculeSplit, thin
from exprae.errors import ConfigError, DataError

RAW = {"normalize_total": None, "log1p": False}  # the input is x' itself, so the halves can be compared as counts


def counts(n_cells: int = 300, n_genes: int = 120, seed: int = 0) -> sp.csr_matrix:
    return synthetic_counts(n_cells, n_genes, n_types=4, store_truth=False, seed=seed).X


def test_halves_are_integer_and_add_up_exactly():
    x = counts()
    x_train, x_held = MoleculeSplit(fraction=0.5, seed=3).split(
        x, np.arange(x.shape[0]), what="test", obs_names=[], var_names=[]
    )
    assert sp.issparse(x_train) and sp.issparse(x_held)
    for half in (x_train, x_held):
        assert half.min() >= 0 and np.array_equal(half.data, np.round(half.data))
    assert (x_train + x_held - x).count_nonzero() == 0
    assert 0 < x_train.sum() < x.sum()


def test_draws_have_binomial_mean_and_variance():
    # 200,000 draws of Binomial(n, 1/2) for n in 1, 7, 40: standard errors of the mean n/4/200k ~ 0.01 at most,
    # of the variance ~ n/4 * sqrt(2/200k) ~ 0.03 at most; the margins are ~6 of those.
    for n in (1, 7, 40):
        x = sp.csr_matrix(np.full((2000, 100), n, dtype=np.float32))
        x_train = thin(x, np.arange(2000), fraction=0.5, seed=1).toarray()
        assert abs(x_train.mean() - n / 2) < 0.06, n
        assert abs(x_train.var() - n / 4) < max(0.2, 0.03 * n), n
    # And the draws of two cells are not copies of each other (each cell has its own generator).
    assert not np.array_equal(x_train[0], x_train[1])


def test_same_split_whatever_the_rows_their_order_or_the_matrix_format():
    x = counts()
    full = thin(x, np.arange(x.shape[0]), fraction=0.5, seed=7).toarray()
    rows = np.random.default_rng(0).permutation(x.shape[0])[:50]
    assert np.array_equal(thin(x[rows], rows, fraction=0.5, seed=7).toarray(), full[rows])
    assert np.array_equal(thin(x[rows].toarray(), rows, fraction=0.5, seed=7).toarray(), full[rows])
    unsorted = x[rows].tocsr()
    for lo, hi in zip(unsorted.indptr[:-1], unsorted.indptr[1:], strict=True):  # same matrix, genes reversed per row
        unsorted.indices[lo:hi], unsorted.data[lo:hi] = unsorted.indices[lo:hi][::-1], unsorted.data[lo:hi][::-1]
    assert not unsorted.has_sorted_indices
    assert np.array_equal(thin(unsorted, rows, fraction=0.5, seed=7).toarray(), full[rows])
    assert not np.array_equal(thin(x, np.arange(x.shape[0]), fraction=0.5, seed=8).toarray(), full)


def _module(path, **kwargs) -> ExpressionDataModule:
    settings = {"path": str(path), "dataset": None, "mcv": {"fraction": 0.5, "seed": 2}, "preprocess": dict(RAW)}
    dm = ExpressionDataModule(**{**settings, **kwargs})
    dm.setup("fit")
    return dm


def _by_cell(dm: ExpressionDataModule, split: str, key: str) -> np.ndarray:
    """Every batch's ``key``, put back in split order by the batches' cell index."""
    loader = dm.loader(split, shuffle=split == "train")
    parts = {int(i): row for batch in loader for i, row in zip(batch["index"], batch[key].numpy(), strict=True)}
    return np.stack([parts[i] for i in range(len(dm.splits[split]))])


@pytest.fixture
def counts_file(tmp_path):
    adata = synthetic_counts(400, 150, n_types=4, store_truth=False, seed=0)
    path = tmp_path / "counts.h5ad"
    adata.write_h5ad(path)
    return path, adata


def test_model_sees_x_prime_and_scores_see_x_double_prime(counts_file):
    path, adata = counts_file
    dm = _module(path)
    x = adata.X.toarray()
    val = dm.splits["val"]
    # Raw preprocessing: the input is x', the held-out counts are x - x', on every validation cell.
    seen, held = _by_cell(dm, "val", X_KEY), _by_cell(dm, "val", MCV_COUNTS_KEY)
    np.testing.assert_array_equal(seen + held, x[val])
    assert held.sum() > 0.4 * x[val].sum()
    # Training batches carry no held-out molecules at all.
    batch = next(iter(dm.train_dataloader()))
    assert MCV_TARGET_KEY not in batch and MCV_COUNTS_KEY not in batch


def test_preprocessing_is_fitted_on_training_x_prime(counts_file):
    path, adata = counts_file
    dm = _module(path, preprocess={**RAW, "scale": True})
    x_train = thin(adata.X, np.arange(adata.n_obs), fraction=0.5, seed=2).toarray()[dm.splits["train"]]
    np.testing.assert_allclose(dm.preprocess.scale_mean, x_train.mean(axis=0), rtol=1e-5)


def test_same_split_whatever_the_batch_size_and_in_backed_mode(counts_file):
    path, _ = counts_file
    preprocess = {"normalize_total": 1e4, "log1p": True, "n_top_genes": 60}
    ref = _module(path, preprocess=dict(preprocess), batch_size=50)
    for other in (
        _module(path, preprocess=dict(preprocess), batch_size=7),
        _module(path, preprocess=dict(preprocess), batch_size=32, backed=True, chunk_size=16, buffer_chunks=2),
    ):
        assert other.var_names == ref.var_names  # HVGs fitted on the same x'
        for key in (X_KEY, MCV_TARGET_KEY, MCV_COUNTS_KEY):
            np.testing.assert_allclose(_by_cell(other, "test", key), _by_cell(ref, "test", key), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("layer", "problem"), [(None, "negative"), ("raw", "non-integer")])
def test_a_matrix_that_is_not_counts_is_refused(layer, problem):
    name = "X" if layer is None else layer
    with pytest.raises(DataError, match=rf"pbmc68k \({name}\) has \d+ {problem} values.*data\.mcv.*raw integer counts"):
        ExpressionDataModule(dataset="pbmc68k", layer=layer, mcv={"fraction": 0.5}).setup("fit")


def test_only_the_half_split_is_scored():
    with pytest.raises(ConfigError, match=r"fraction=0\.3 is not supported.*depth correction"):
        MoleculeSplit(fraction=0.3)
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        MoleculeSplit(fraction=1.0)
    assert not MoleculeSplit().enabled


def test_fraction_zero_is_refused_as_outside_the_open_interval():
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        MoleculeSplit(fraction=0.0)
    assert MoleculeSplit(fraction=0.5, seed=3).to_dict() == {"fraction": 0.5, "seed": 3}


def test_halves_are_float32_of_the_input_shape_and_the_input_is_left_untouched():
    # Integer counts whose last gene is never detected (the halves keep every gene), with explicit zeros and
    # unsorted indices in a float64 CSR: thinning sorts and prunes its own copy, never the caller's matrix.
    x = sp.csr_matrix(
        (np.array([3.0, 0.0, 5.0, 2.0]), np.array([2, 0, 1, 0]), np.array([0, 3, 4])), shape=(2, 4), dtype=np.float64
    )
    assert not x.has_sorted_indices
    before = (x.data.copy(), x.indices.copy())
    x_train, x_held = MoleculeSplit(fraction=0.5, seed=0).split(
        x, np.arange(2), what="test", obs_names=["a", "b"], var_names=list("wxyz")
    )
    for half in (x_train, x_held):
        assert half.shape == (2, 4) and half.dtype == np.float32
    assert thin(x.astype(np.int64), np.arange(2), fraction=0.5, seed=0).dtype == np.float32
    np.testing.assert_array_equal(x.data, before[0])
    np.testing.assert_array_equal(x.indices, before[1])
    np.testing.assert_array_equal((x_train + x_held).toarray(), x.toarray())
