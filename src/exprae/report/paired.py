"""Paired per-cell comparison of two settings: the difference on the same held-out cells, with a bootstrap.

Two settings trained on the same split are scored on the same cells, so the informative comparison is cell
by cell: most of the cell-to-cell variation (some cells are simply hard) cancels in the difference. The
bootstrap resamples the cells (with replacement, the same cells for both settings, keeping the pairing) and,
where each setting has several runs paired by seed, the seeds too; where the runs used different splits
(``data.split_seed``), each split's cells are resampled within that split. The statistics are differences of
the per-cell summaries a report shows: mean, median and 10th percentile (the worst-reconstructed tenth).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from exprae.runs import rundir

STATISTICS = ("mean", "median", "p10")
CONFIDENCE = 0.95


def _stat(values_rn: np.ndarray, name: str) -> np.ndarray:
    """The statistic of each row (a replicate's cells)."""
    if name == "mean":
        return values_rn.mean(axis=-1)
    if name == "median":
        return np.median(values_rn, axis=-1)
    return np.quantile(values_rn, 0.1, axis=-1)


@dataclass(frozen=True)
class Interval:
    """A point estimate of ``a − b`` and its bootstrap percentile interval."""

    estimate: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def text(self, digits: int = 4) -> str:
        return f"{self.estimate:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


@dataclass(frozen=True)
class PairedDifference:
    """``a − b`` per statistic, the number of cells and of paired runs it rests on, and the replicates."""

    intervals: dict[str, Interval]
    n_cells: int
    n_pairs: int
    replicates: dict[str, np.ndarray]


def paired_bootstrap(
    pairs: Sequence[tuple[np.ndarray, np.ndarray, str]],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> PairedDifference:
    """Bootstrap ``stat(a) − stat(b)`` over cells, and over paired runs where there are several.

    ``pairs`` holds one ``(a_n, b_n, group)`` per pair of runs (the same seed): both settings' per-cell scores
    on the same cells in the same order; ``group`` names the split, so pairs on the same split share the
    resampled cells. Each replicate draws the pairs of every group with replacement (if a group has more than
    one) and that group's cells with replacement, then averages the per-pair differences over all drawn pairs.
    """
    if not pairs:
        raise ValueError("no paired runs to compare")
    rng = np.random.default_rng(seed)
    groups: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for a_n, b_n, group in pairs:
        a_n, b_n = np.asarray(a_n, dtype=float), np.asarray(b_n, dtype=float)
        if a_n.shape != b_n.shape or a_n.ndim != 1 or len(a_n) == 0:
            raise ValueError(f"paired scores must be two equal-length 1-d arrays, got {a_n.shape} and {b_n.shape}")
        groups.setdefault(group, []).append((a_n, b_n))
    for group, members in groups.items():
        if len({len(a) for a, _ in members}) > 1:
            raise ValueError(f"pairs of split {group!r} are scored on different numbers of cells")

    estimate = {name: [] for name in STATISTICS}
    replicate_parts = {name: [] for name in STATISTICS}
    weights = []
    for members in groups.values():
        a_pn = np.stack([a for a, _ in members])  # pairs x cells
        b_pn = np.stack([b for _, b in members])
        n_pairs, n_cells = a_pn.shape
        cells_bn = rng.integers(0, n_cells, size=(n_boot, n_cells))
        runs_bp = rng.integers(0, n_pairs, size=(n_boot, n_pairs)) if n_pairs > 1 else np.zeros((n_boot, 1), int)
        for name in STATISTICS:
            estimate[name].append((_stat(a_pn, name) - _stat(b_pn, name)).mean())
            # Per replicate: the drawn cells of every pair, then the mean over the drawn pairs. In chunks of
            # replicates, so pairs x replicates x cells stays small for large test sets.
            diff_bp = np.concatenate(
                [
                    _stat(a_pn[:, chunk], name) - _stat(b_pn[:, chunk], name)
                    for chunk in np.array_split(cells_bn, max(1, n_boot * n_pairs * n_cells // 2_000_000))
                ],
                axis=1,
            )  # pairs x boot
            replicate_parts[name].append(np.take_along_axis(diff_bp.T, runs_bp, axis=1).mean(axis=1))
        weights.append(n_pairs)
    w = np.asarray(weights, dtype=float) / sum(weights)
    tail = (1 - confidence) / 2 * 100
    intervals, replicates = {}, {}
    for name in STATISTICS:
        reps = np.average(np.stack(replicate_parts[name]), axis=0, weights=w)
        low, high = np.percentile(reps, [tail, 100 - tail])
        intervals[name] = Interval(float(np.average(estimate[name], weights=w)), float(low), float(high))
        replicates[name] = reps
    n_cells = sum(len(members[0][0]) for members in groups.values())
    return PairedDifference(intervals, n_cells=n_cells, n_pairs=len(pairs), replicates=replicates)


def read_cells(run_dir: str | Path) -> pd.DataFrame | None:
    """A run's per-cell scores (``cells.csv``), or None for a run that did not write them."""
    path = Path(run_dir) / rundir.CELLS_FILE
    return pd.read_csv(path) if path.is_file() else None


def pair_runs(
    a_runs: Mapping[tuple, Path], b_runs: Mapping[tuple, Path], *, stage: str, column: str
) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """Pairs of per-cell scores for the runs of two settings keyed alike (``(split_seed, seed)``), on shared cells.

    Runs without ``cells.csv`` and keys present in one setting only are skipped; cells are matched by name.
    """
    pairs = []
    for key in sorted(set(a_runs) & set(b_runs), key=str):
        a, b = read_cells(a_runs[key]), read_cells(b_runs[key])
        if a is None or b is None or column not in a or column not in b:
            continue
        a = a[a["split"] == stage].set_index("obs_name")[column]
        b = b[b["split"] == stage].set_index("obs_name")[column]
        shared = a.index.intersection(b.index)
        if len(shared):
            pairs.append((a.loc[shared].to_numpy(), b.loc[shared].to_numpy(), str(key[0])))
    return pairs
