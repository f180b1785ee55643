"""Covariates (data.batch_key): encoded once on all cells, served as codes, recorded in the contract."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from exprae.constants import BATCH_KEY, INDEX_KEY
from exprae.data import ExpressionDataModule
from exprae.data.covariates import encode, level_code, recode
from exprae.data.datasets import synthetic_counts
from exprae.errors import ConfigError, DataError, MissingKeyError


def test_levels_follow_the_category_order_or_sort_a_plain_column():
    obs = pd.DataFrame(
        {
            "cat": pd.Categorical(["b", "a", "b", "c"], categories=["c", "b", "a", "unused"]),
            "plain": ["s2", "s10", "s2", "s1"],
            "number": [3, 1, 3, 2],
        }
    )
    cov = encode(obs, ["cat", "plain", "number"], what="cells.h5ad")
    assert cov.categories == {"cat": ["c", "b", "a"], "plain": ["s1", "s10", "s2"], "number": ["1", "2", "3"]}
    np.testing.assert_array_equal(cov.codes_nk, [[1, 2, 2], [2, 1, 0], [1, 2, 2], [0, 0, 1]])
    assert cov.n_levels == [3, 3, 3]
    # New cells are coded against the saved levels, whatever their own order.
    np.testing.assert_array_equal(recode(obs.iloc[::-1], cov.categories, what="new.h5ad"), cov.codes_nk[::-1])


def test_a_missing_column_or_nan_is_a_clear_error_naming_the_column():
    obs = pd.DataFrame({"sample": ["a", None, "b"]}, index=["c1", "c2", "c3"])
    with pytest.raises(MissingKeyError, match=r"'donor'.*available: \['sample'\]"):
        encode(obs, ["donor"], what="cells.h5ad")
    with pytest.raises(DataError, match=r"'sample' of cells.h5ad has 1 missing values.*c2"):
        encode(obs, ["sample"], what="cells.h5ad")


def test_an_unknown_level_lists_the_known_ones():
    categories = {"condition": ["ctrl", "stim"]}
    with pytest.raises(DataError, match=r"\['other'\].*known levels: \['ctrl', 'stim'\]"):
        recode(pd.DataFrame({"condition": ["ctrl", "other"]}), categories, what="new.h5ad")
    assert level_code(categories, "stim") == 1
    with pytest.raises(ConfigError, match=r"'STIM' is not a level of 'condition'; known levels: \['ctrl', 'stim'\]"):
        level_code(categories, "STIM")
    with pytest.raises(ConfigError, match=r"data.batch_key"):
        level_code({}, "ctrl")


@pytest.fixture(scope="module")
def sample_file(tmp_path_factory):
    adata = synthetic_counts(300, 80, seed=3, library_mean=500, store_truth=False)
    rng = np.random.default_rng(0)
    adata.obs["sample"] = pd.Categorical(rng.choice(["s1", "s2", "s3"], size=adata.n_obs))
    adata.obs["chemistry"] = rng.choice(["v2", "v3"], size=adata.n_obs)
    path = tmp_path_factory.mktemp("cov") / "cells.h5ad"
    adata.write_h5ad(path)
    return path, adata.obs


@pytest.mark.parametrize("backed", [False, True])
def test_batches_carry_each_cells_codes(sample_file, backed):
    path, obs = sample_file
    dm = ExpressionDataModule(
        dataset=None,
        path=str(path),
        batch_key=["sample", "chemistry"],
        preprocess={"normalize_total": 1e4, "log1p": True},
        batch_size=32,
        backed=backed,
        chunk_size=64,
        buffer_chunks=2,
    )
    dm.setup("fit")
    assert dm.n_batches == [3, 2]
    assert dm.contract()["batch_categories"] == {"sample": ["s1", "s2", "s3"], "chemistry": ["v2", "v3"]}
    expected = np.stack([obs["sample"].cat.codes, (obs["chemistry"] == "v3").astype(int)], axis=1)
    for split in ("train", "val"):
        for batch in dm.loader(split, shuffle=split == "train"):
            rows = dm.splits[split][batch[INDEX_KEY].numpy()]
            np.testing.assert_array_equal(batch[BATCH_KEY].numpy(), expected[rows])
            assert batch[BATCH_KEY].dtype == torch.long
    assert all(isinstance(c, torch.Tensor) for c in dm.train_chunks(50))
    chunks = list(dm.train_chunks(50, with_batches=True))
    assert all(isinstance(c, tuple) for c in chunks)
    codes = torch.cat([b for _, b in chunks]).numpy()
    np.testing.assert_array_equal(codes, expected[dm.splits["train"], 0])
    assert sum(len(x) for x, _ in chunks) == len(dm.splits["train"]) and chunks[0][0].shape[1] == dm.n_genes


def test_without_batch_key_nothing_changes(sample_file):
    path, _ = sample_file
    dm = ExpressionDataModule(dataset=None, path=str(path), batch_size=32)
    dm.setup("fit")
    assert dm.n_batches == [] and dm.contract()["batch_categories"] is None
    assert BATCH_KEY not in next(iter(dm.train_dataloader()))
    assert isinstance(next(dm.train_chunks(with_batches=True)), torch.Tensor)


def test_datamodule_names_a_missing_batch_column(sample_file):
    path, _ = sample_file
    dm = ExpressionDataModule(dataset=None, path=str(path), batch_key="donor", batch_size=32)
    with pytest.raises(MissingKeyError, match=r"data.batch_key: obs column 'donor' not found"):
        dm.setup("fit")
    with pytest.raises(ConfigError, match=r"distinct"):
        ExpressionDataModule(dataset=None, path=str(path), batch_key=["sample", "sample"])
