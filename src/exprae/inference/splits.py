"""Which cells a trained model saw: each embedded cell marked train / val / test / new from the run's split.

A score over cells the model was trained on is not a held-out score. On pbmc68k 560 of 700 cells are
training cells, whose cosine (0.55) is far above the held-out one (0.41): a UMAP coloured by cosine, or a
median over every cell, over-reports the model unless the training cells are told apart. The run's
``split.csv`` names every cell it was trained, validated and tested on; cells are matched to it **by name**
(``obs_names``), so cells from another dataset are "new" unless they share a name with one of the run's
cells (re-used barcodes from another sample would be matched too: rename them, e.g. with a sample suffix).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from exprae.runs import rundir

SPLITS = ("train", "val", "test", "new")  # "new": not in the run's split.csv
HELD_OUT = ("val", "test")
AMBIGUOUS = "ambiguous"  # a name the run's split.csv lists under two splits (duplicated cell names)
UNKNOWN = "unknown"  # the run has no split.csv (trained by an older exprae)


def read_split(run_dir: str | Path) -> pd.Series | None:
    """The run's split as a Series ``obs_name -> split``, or None where the run has no ``split.csv``."""
    path = Path(run_dir) / rundir.SPLIT_FILE
    if not path.is_file():
        return None
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    by_name = table.groupby("obs_name", sort=False)["split"]
    split = by_name.first()
    split[by_name.nunique() > 1] = AMBIGUOUS  # the same name in two splits: neither claim can be trusted
    return split


def split_marks(obs_names: Sequence[str], run_dir: str | Path) -> pd.Categorical:
    """Each cell's split in the run that trained the model (``train``/``val``/``test``/``new``), by cell name."""
    split = read_split(run_dir)
    categories = [*SPLITS, AMBIGUOUS, UNKNOWN]
    if split is None:
        warnings.warn(
            f"{Path(run_dir) / rundir.SPLIT_FILE} is missing, so it is unknown which cells the model was trained "
            "on; treat every score as possibly including training cells",
            UserWarning,
            stacklevel=3,
        )
        return pd.Categorical([UNKNOWN] * len(obs_names), categories=categories)
    marks = pd.Index(obs_names).map(split).to_numpy(dtype=object)
    marks[pd.isna(marks)] = "new"
    return pd.Categorical(marks, categories=categories).remove_unused_categories()


def split_counts(splits: pd.Categorical) -> dict[str, int]:
    """Cells per split, in the order of :data:`SPLITS`, splits without cells left out."""
    counts = pd.Series(splits).value_counts(sort=False)
    return {str(k): int(v) for k, v in counts.items() if v > 0}


GROUPS = (  # (label, splits in the group, note): held-out first, the only group that measures the model
    ("held-out (val+test)", HELD_OUT, ""),
    ("training", ("train",), "cells the model was trained on: not a quality score"),
    ("new", ("new",), "cells the run never saw"),
    (AMBIGUOUS, (AMBIGUOUS,), "duplicated names in the run's split.csv"),
    (UNKNOWN, (UNKNOWN,), "the run has no split.csv"),
)
SCORERS = (("cosine", "model"), ("pca_cosine", "PCA"), ("meanprofile_cosine", "mean profile"))


def summary(adata: ad.AnnData, *, key_added: str = "exprae") -> str:
    """A table of per-cell cosine (median, 10th percentile) per group of cells: held-out, training, new.

    Written by :func:`exprae.embed`'s keys; the baselines' columns appear where ``embed(..., baselines=True)``
    wrote them. Each group is its own row, so a training-cell score is never averaged into a held-out one.
    """
    splits = adata.obs[f"{key_added}_split"].astype(str).to_numpy()
    scorers = [(label, f"{key_added}_{name}") for name, label in SCORERS if f"{key_added}_{name}" in adata.obs]
    header = f"{'per-cell cosine':<21}{'cells':>7}" + "".join(
        f"{f'{label} median':>20}{'p10':>8}" for label, _ in scorers
    )
    lines = [header]
    for label, members, note in GROUPS:
        mask = np.isin(splits, members)
        if not mask.any():
            continue
        row = f"{label:<21}{int(mask.sum()):>7}"
        for _, column in scorers:
            values = adata.obs[column].to_numpy(dtype=float)[mask]
            row += f"{np.nanmedian(values):>20.4f}{np.nanquantile(values, 0.1):>8.4f}"
        lines.append(row + (f"   ({note})" if note else ""))
    return "\n".join(lines)


def gene_r_cells(splits: pd.Categorical) -> tuple[np.ndarray, str]:
    """Which rows a per-gene score should use, and a label saying so: the cells not trained on, where any."""
    not_train = np.asarray(splits) != "train"
    if not_train.any():
        return not_train, f"{int(not_train.sum())} cells not in the run's training set (held-out and new)"
    return np.ones(len(splits), dtype=bool), f"all {len(splits)} cells, every one a training cell"
