"""Splitting cells into seeded train/validation/test sets, optionally stratified by a label."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from exprae.errors import ConfigError, DataError, MissingKeyError

MIN_HELD_OUT = 10  # fewer validation or test cells than this gets a warning: their mean metric is mostly noise

# ---------------------------------------------------------------- splitting


def split_cells(
    n_cells: int, *, val_fraction: float, test_fraction: float, seed: int, stratify: Sequence | None = None
) -> dict[str, np.ndarray]:
    """Seeded train/val/test row indices (sorted); stratified by ``stratify`` labels when given."""
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < f < 1.0:
            raise ConfigError(f"data.{name} must lie in (0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} leaves no training cells"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"data.split_seed must be a non-negative integer, got {seed!r}")
    n_val, n_test = round(n_cells * val_fraction), round(n_cells * test_fraction)
    n_train = n_cells - n_val - n_test
    if min(n_val, n_test) < 1 or n_train < 2:
        raise DataError(
            f"{n_cells} cells are too few for the split val={val_fraction}, test={test_fraction}: it gives "
            f"{n_train} train, {n_val} val, {n_test} test cells (each set needs cells; train at least 2)"
        )
    rng = np.random.default_rng(seed)
    if stratify is None:
        perm = rng.permutation(n_cells)
    else:
        # Interleave a shuffled order within each label so every prefix is stratified, then cut. Cells
        # without a label (NaN/None, code -1) are one more stratum of their own, so every cell gets a rank.
        # Codes in increasing order, the draws made only for codes that have cells: the splits of earlier
        # versions, which looped over every code and skipped the empty ones, are reproduced cell for cell.
        labels = pd.Categorical(np.asarray(stratify))
        rank = np.empty(n_cells)
        for code in np.unique(labels.codes):
            idx = np.flatnonzero(labels.codes == code)
            rank[rng.permutation(idx)] = (np.arange(len(idx)) + rng.random()) / len(idx)
        # Two strata tie only if their random offsets make (i + r) / n equal: probability zero, so any sort works.
        perm = np.argsort(rank)
    return {
        "val": np.sort(perm[:n_val]),
        "test": np.sort(perm[n_val : n_val + n_test]),
        "train": np.sort(perm[n_val + n_test :]),
    }


def split_obs(
    obs: pd.DataFrame,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    stratify_key: str | None,
    label_key: str | None,
    what: str,
    stacklevel: int = 2,
) -> dict[str, np.ndarray]:
    """Check the obs columns the split and the labels use, then split the cells (:func:`split_cells`).

    Warns where missing stratification labels form a stratum of their own and where a held-out set is too small
    for its mean metric to compare runs.
    """
    for key in (stratify_key, label_key):
        if key is not None and key not in obs:
            raise MissingKeyError(f"obs column {key!r} not found in {what}; available: {list(obs.columns)}")
    if label_key is not None and obs[label_key].isna().all():
        # Unlabelled cells are left out of the auxiliary loss, so an all-missing column would silently turn
        # it off (and leave the kNN label accuracy undefined).
        raise DataError(
            f"obs column {label_key!r} of {what} (aux.label_key) has no labels: all {len(obs)} values are "
            "missing (NaN/None); choose a column with labels, or drop the auxiliary loss (aux=none)"
        )
    if stratify_key is not None and obs[stratify_key].isna().any():
        n_missing = int(obs[stratify_key].isna().sum())
        warnings.warn(
            f"{n_missing} cells of {what} have no {stratify_key!r} label (data.stratify_key); they are split "
            "as one more stratum of their own",
            stacklevel=stacklevel + 1,
        )
    splits = split_cells(
        len(obs),
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        stratify=None if stratify_key is None else obs[stratify_key].to_numpy(),
    )
    small = {name: len(splits[name]) for name in ("val", "test") if len(splits[name]) < MIN_HELD_OUT}
    if small:
        warnings.warn(
            f"{what}: only {', '.join(f'{n} {name}' for name, n in small.items())} cells; metrics averaged over "
            f"fewer than {MIN_HELD_OUT} held-out cells are too noisy to compare runs (use more cells or larger "
            "data.val_fraction / data.test_fraction)",
            stacklevel=stacklevel + 1,
        )
    return splits
