"""Splitting cells into seeded train/validation/test sets, optionally stratified by a label."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from exprae.errors import ConfigError, DataError

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
