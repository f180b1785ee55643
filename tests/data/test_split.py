"""``split_cells`` and ``split_obs`` on hand-made cases: set sizes, what is refused, and how strata (missing labels included) are cut.

Written against the contract users rely on (README, "Data": seeded, stratified, every cell in exactly one set), and
sized so that each boundary of the validation sits on a test; `make mutation` checks that they bite.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from exprae.data import split_cells
from exprae.data.split import MIN_HELD_OUT, split_obs
from exprae.errors import ConfigError, DataError, MissingKeyError


def _sizes(split: dict[str, np.ndarray]) -> tuple[int, int, int]:
    return len(split["train"]), len(split["val"]), len(split["test"])


@pytest.mark.parametrize(
    ("n", "val", "test", "sizes"),
    [
        (100, 0.1, 0.2, (70, 10, 20)),
        (10, 0.15, 0.25, (6, 2, 2)),  # round(1.5) = 2, round(2.5) = 2: Python's rounding, half to even
        (5, 0.2, 0.4, (2, 1, 2)),  # the smallest training set allowed: 2 cells
    ],
)
def test_sets_have_the_rounded_sizes_and_partition_the_cells(n, val, test, sizes):
    split = split_cells(n, val_fraction=val, test_fraction=test, seed=0)
    assert _sizes(split) == sizes
    everything = np.concatenate([split["train"], split["val"], split["test"]])
    np.testing.assert_array_equal(np.sort(everything), np.arange(n))
    for rows in split.values():
        np.testing.assert_array_equal(rows, np.sort(rows))


@pytest.mark.parametrize(
    ("val", "test", "key"),
    [(0.0, 0.1, "val_fraction"), (1.0, 0.1, "val_fraction"), (0.1, 0.0, "test_fraction"), (0.1, 1.0, "test_fraction")],
)
def test_fractions_outside_the_open_unit_interval_are_refused_by_name(val, test, key):
    with pytest.raises(ConfigError, match=rf"data\.{key} must lie in \(0, 1\)"):
        split_cells(100, val_fraction=val, test_fraction=test, seed=0)


def test_fractions_that_leave_no_training_cells_are_refused():
    with pytest.raises(ConfigError, match="leaves no training cells"):
        split_cells(100, val_fraction=0.5, test_fraction=0.5, seed=0)
    # Just under one is a valid configuration (refused later only if too few cells remain).
    assert _sizes(split_cells(1000, val_fraction=0.5, test_fraction=0.49, seed=0)) == (10, 500, 490)


@pytest.mark.parametrize("seed", [True, -1, 1.0, "0", None])
def test_split_seed_must_be_a_non_negative_integer(seed):
    with pytest.raises(ConfigError, match=r"data\.split_seed must be a non-negative integer"):
        split_cells(100, val_fraction=0.1, test_fraction=0.1, seed=seed)


@pytest.mark.parametrize("seed", [0, np.int64(7)])
def test_zero_and_numpy_integers_are_valid_seeds(seed):
    assert _sizes(split_cells(100, val_fraction=0.1, test_fraction=0.1, seed=seed)) == (80, 10, 10)


@pytest.mark.parametrize(("n", "val", "test"), [(4, 0.4, 0.3), (10, 0.01, 0.5), (10, 0.5, 0.01), (3, 0.34, 0.34)])
def test_too_few_cells_for_a_set_is_a_data_error_naming_the_sizes(n, val, test):
    n_val, n_test = round(n * val), round(n * test)
    n_train = n - n_val - n_test
    assert min(n_val, n_test) < 1 or n_train < 2, "case must be one that is too small"
    with pytest.raises(DataError, match=f"{n} cells are too few.*{n_train} train, {n_val} val, {n_test} test"):
        split_cells(n, val_fraction=val, test_fraction=test, seed=0)


def test_the_split_is_a_seeded_permutation_cut_in_val_test_train_order():
    # The documented recipe (README, "Data"): numpy's default_rng(split_seed) permutes the cells; the first n_val are
    # validation, the next n_test test, the rest training. Pinning it keeps old runs' held-out cells reproducible.
    perm = np.random.default_rng(5).permutation(50)
    split = split_cells(50, val_fraction=0.2, test_fraction=0.1, seed=5)
    np.testing.assert_array_equal(split["val"], np.sort(perm[:10]))
    np.testing.assert_array_equal(split["test"], np.sort(perm[10:15]))
    np.testing.assert_array_equal(split["train"], np.sort(perm[15:]))


def _count(rows: np.ndarray, labels: np.ndarray, value: object) -> int:
    picked = labels[rows]
    if value is None:
        return int(sum(v is None for v in picked))
    return int(sum(v == value for v in picked))


def test_every_stratum_is_split_in_proportion_whatever_its_size():
    # Strata of very different sizes: a rank that is not scaled to [0, 1) within each label would send the big
    # label's cells to the end of the order (training) and the small ones to validation.
    labels = np.array(["a"] * 400 + ["b"] * 100 + ["c"] * 20, dtype=object)
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    for seed in range(3):
        split = split_cells(len(labels), val_fraction=0.2, test_fraction=0.1, seed=seed, stratify=labels)
        for label, n in (("a", 400), ("b", 100), ("c", 20)):
            assert abs(_count(split["val"], labels, label) - 0.2 * n) <= 1
            assert abs(_count(split["test"], labels, label) - 0.1 * n) <= 1


def test_cells_without_a_label_are_a_stratum_of_their_own():
    labels = np.array(["a"] * 60 + [None] * 40, dtype=object)
    split = split_cells(100, val_fraction=0.2, test_fraction=0.2, seed=1, stratify=labels)
    assert _sizes(split) == (60, 20, 20)
    for part, fraction in (("val", 0.2), ("test", 0.2), ("train", 0.6)):
        assert abs(_count(split[part], labels, None) - fraction * 40) <= 1
        assert abs(_count(split[part], labels, "a") - fraction * 60) <= 1


def test_stratified_split_is_seeded():
    labels = np.repeat(["a", "b", "c"], 30)
    a = split_cells(90, val_fraction=0.2, test_fraction=0.2, seed=2, stratify=labels)
    b = split_cells(90, val_fraction=0.2, test_fraction=0.2, seed=2, stratify=labels)
    c = split_cells(90, val_fraction=0.2, test_fraction=0.2, seed=3, stratify=labels)
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(a[part], b[part])
    assert not np.array_equal(a["val"], c["val"])


def test_a_split_seed_keeps_selecting_the_same_cells_across_versions():
    # Runs made months apart are compared on "the same held-out cells": the cells a split_seed picks are part of
    # the contract. Recorded with the stratified recipe of exprae 0.1 (unchanged since the split was stratified).
    labels = np.array(["a"] * 10 + ["b"] * 6 + [None] * 4, dtype=object)
    split = split_cells(20, val_fraction=0.25, test_fraction=0.25, seed=11, stratify=labels)
    assert split["val"].tolist() == [2, 7, 8, 14, 17]
    assert split["test"].tolist() == [0, 1, 10, 12, 16]


# ---------------------------------------------------------------- split_obs: the obs checks around split_cells


def _obs(n: int, **columns: list) -> pd.DataFrame:
    return pd.DataFrame(columns, index=[f"c{i}" for i in range(n)])


def _split_obs(obs: pd.DataFrame, **keys: str | None) -> dict[str, np.ndarray]:
    settings = {"stratify_key": None, "label_key": None, **keys}
    return split_obs(obs, val_fraction=0.1, test_fraction=0.1, seed=0, what="cells.h5ad (X)", **settings)


def test_split_obs_is_split_cells_stratified_by_the_named_column():
    obs = _obs(100, kind=["a", "b", "c", "d"] * 25)
    got = _split_obs(obs, stratify_key="kind")
    want = split_cells(100, val_fraction=0.1, test_fraction=0.1, seed=0, stratify=obs["kind"].to_numpy())
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(got[name], want[name])


@pytest.mark.parametrize("which", ["stratify_key", "label_key"])
def test_split_obs_refuses_a_missing_column_and_names_the_ones_there(which):
    with pytest.raises(
        MissingKeyError, match=r"obs column 'celltype' not found in cells.h5ad \(X\); available: \['kind'\]"
    ):
        _split_obs(_obs(100, kind=["a"] * 100), **{which: "celltype"})


def test_split_obs_refuses_a_label_column_without_labels_but_accepts_some_missing():
    with pytest.raises(DataError, match=r"'kind' of cells.h5ad \(X\) \(aux.label_key\) has no labels: all 100"):
        _split_obs(_obs(100, kind=[None] * 100), label_key="kind")
    _split_obs(_obs(100, kind=[None] * 99 + ["a"]), label_key="kind")  # one label is enough


def test_split_obs_warns_about_unlabelled_strata_and_small_held_out_sets():
    with pytest.warns(UserWarning, match=r"2 cells of cells.h5ad \(X\) have no 'kind' label"):
        _split_obs(_obs(100, kind=["a", None, "b", None] + ["a"] * 96), stratify_key="kind")
    with pytest.warns(UserWarning, match=f"only 9 val, 9 test cells; .* fewer than {MIN_HELD_OUT} held-out"):
        _split_obs(_obs(90))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 10 of each: no warning
        _split_obs(_obs(100, kind=["a", "b"] * 50), stratify_key="kind")
