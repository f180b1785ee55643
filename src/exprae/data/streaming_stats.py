"""Preprocessing fitted in one streaming pass: per-gene moments, highly-variable genes, scaling statistics.

For data that never sits in memory at once (``data.backed=true``). The result is the same
:class:`~exprae.data.preprocessing.Preprocessing` record the in-memory path fits, so a run directory, ``predict``
and ``transform`` do not know which path trained the model.

Highly variable genes follow scanpy's ``seurat`` and ``cell_ranger`` flavors exactly (scanpy 1.11,
``_highly_variable_genes_single_batch`` with ``n_top_genes``); both only need each gene's mean and
unbiased variance, which are exact sums over chunks:

- ``seurat``: mean and variance of ``expm1(x)`` (the log data undone); dispersion ``log(var / mean)``
  (zero dispersion → NaN), mean ``log1p(mean)``; genes cut into 20 equal-width mean bins; normalised
  dispersion ``(d - bin mean) / bin std`` (a bin with one gene: its gene gets 1).
- ``cell_ranger``: mean and variance of ``x``; dispersion ``var / mean``; bins at the 10th, 15th, …, 100th
  percentiles of the means; normalised dispersion ``(d - bin median) / bin MAD``.

Then every gene whose normalised dispersion reaches the ``n_top_genes``-th highest is kept (ties included,
as scanpy). ``seurat_v3`` needs a loess fit on raw counts and is not offered here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import norm

from exprae.data.preprocessing import Preprocessing, keeps_all_genes
from exprae.errors import ConfigError, DataError

STREAMING_HVG_FLAVORS = ("seurat", "cell_ranger")
N_BINS = 20  # scanpy's default n_bins


class GeneMoments:
    """Running per-gene count, sum and sum of squares in float64, over sparse or dense chunks."""

    def __init__(self, n_genes: int) -> None:
        self.n = 0
        self.sum_g = np.zeros(n_genes, dtype=np.float64)
        self.sumsq_g = np.zeros(n_genes, dtype=np.float64)

    def update(self, x_ng: np.ndarray | sp.spmatrix) -> None:
        """Add a chunk of cells."""
        if sp.issparse(x_ng):
            csr = sp.csr_matrix(x_ng)
            values = csr.data.astype(np.float64)
            self.sum_g += np.bincount(csr.indices, weights=values, minlength=len(self.sum_g))
            self.sumsq_g += np.bincount(csr.indices, weights=values * values, minlength=len(self.sum_g))
        else:
            x = np.asarray(x_ng, dtype=np.float64)
            self.sum_g += x.sum(axis=0)
            self.sumsq_g += np.einsum("ng,ng->g", x, x)
        self.n += x_ng.shape[0]

    @property
    def mean_g(self) -> np.ndarray:
        return self.sum_g / max(self.n, 1)

    @property
    def var_g(self) -> np.ndarray:
        """Unbiased (n - 1) variance, scanpy's and the in-memory Preprocessing's convention."""
        mean = self.mean_g
        var = self.sumsq_g / max(self.n, 1) - mean**2
        return var * self.n / (self.n - 1) if self.n > 1 else var


def highly_variable_from_moments(
    mean_g: np.ndarray,
    var_g: np.ndarray,
    *,
    n_top_genes: int,
    flavor: Literal["seurat", "cell_ranger"],
) -> np.ndarray:
    """Boolean mask of highly variable genes from per-gene mean and variance, as scanpy computes it."""
    if flavor not in STREAMING_HVG_FLAVORS:
        raise ConfigError(
            f"preprocess.hvg_flavor={flavor!r} cannot be fitted in a streaming pass; choose one of "
            f"{list(STREAMING_HVG_FLAVORS)} with data.backed=true"
        )
    mean = np.array(mean_g, dtype=np.float64)
    mean[mean == 0] = 1e-12
    dispersion = np.asarray(var_g, dtype=np.float64) / mean
    if flavor == "seurat":
        dispersion[dispersion == 0] = np.nan
        with np.errstate(divide="ignore", invalid="ignore"):
            dispersion = np.log(dispersion)
        mean = np.log1p(mean)
    df = pd.DataFrame({"means": mean, "dispersions": dispersion})
    if flavor == "seurat":
        df["mean_bin"] = pd.cut(df["means"], bins=N_BINS)
        stats = df.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
        single = stats["dev"].isnull()  # one gene in the bin: scanpy sets its normalised dispersion to 1
        stats.loc[single, "dev"] = stats.loc[single, "avg"]
        stats.loc[single, "avg"] = 0
    else:
        edges = np.r_[-np.inf, np.percentile(df["means"], np.arange(10, 105, 5)), np.inf]
        df["mean_bin"] = pd.cut(df["means"], bins=edges)
        stats = df.groupby("mean_bin", observed=True)["dispersions"].agg(avg="median", dev=_mad)
    per_gene = stats.loc[df["mean_bin"]].set_index(df.index)
    norm_disp = ((df["dispersions"] - per_gene["avg"]) / per_gene["dev"]).to_numpy()
    finite = np.sort(norm_disp[~np.isnan(norm_disp)])[::-1]
    cutoff = finite[min(n_top_genes, finite.size) - 1]
    return np.nan_to_num(norm_disp, nan=-np.inf) >= cutoff


def _mad(a: pd.Series) -> float:
    """Median absolute deviation scaled to a Gaussian sd (statsmodels' ``mad``, as scanpy uses)."""
    values = a.to_numpy(dtype=np.float64)
    if values.size == 0:
        return np.nan
    return float(np.median(np.abs(values - np.median(values))) / norm.ppf(0.75))


def fit_streaming(
    preprocess: Preprocessing, chunks: Iterable[np.ndarray | sp.spmatrix], *, var_names: Sequence[str]
) -> Preprocessing:
    """Fit ``preprocess`` (genes, scaling) in one pass over chunks of training cells after its per-cell steps.

    Keeps two float64 accumulators per gene (of ``x`` and, for ``seurat`` HVG, of ``expm1(x)``), so the
    memory is a few vectors of the gene count whatever the number of cells.
    """
    var_names = np.asarray(var_names)
    n_top = preprocess.n_top_genes
    if n_top is not None:
        if preprocess.hvg_flavor not in STREAMING_HVG_FLAVORS:
            raise ConfigError(
                f"preprocess.hvg_flavor={preprocess.hvg_flavor!r} cannot be fitted in a streaming pass; choose "
                f"one of {list(STREAMING_HVG_FLAVORS)} with data.backed=true"
            )
        if keeps_all_genes(int(n_top), len(var_names)):
            n_top = None
    seurat = n_top is not None and preprocess.hvg_flavor == "seurat"
    moments_x = GeneMoments(len(var_names))
    moments_counts = GeneMoments(len(var_names)) if seurat else None
    for x_ng in chunks:
        moments_x.update(x_ng)
        if moments_counts is not None:
            moments_counts.update(x_ng.expm1() if sp.issparse(x_ng) else np.expm1(np.asarray(x_ng, dtype=np.float64)))
    if moments_x.n < 2:
        raise DataError(f"fitting the preprocessing needs at least 2 training cells, got {moments_x.n}")
    keep = np.ones(len(var_names), dtype=bool)
    if preprocess.normalize_total is not None:
        preprocess.library_genes = [str(g) for g in var_names]
    if n_top is not None:
        hvg_moments = moments_counts if seurat else moments_x
        if not (hvg_moments.var_g > 0).any():
            raise DataError(
                f"no gene varies across the {moments_x.n} training cells (all-zero or constant data), so "
                f"preprocess.n_top_genes={n_top} has nothing to rank; check the input matrix, or set "
                "data.preprocess.n_top_genes=null"
            )
        keep = highly_variable_from_moments(
            hvg_moments.mean_g, hvg_moments.var_g, n_top_genes=int(n_top), flavor=preprocess.hvg_flavor
        )
    preprocess.genes = [str(g) for g in var_names[keep]]
    if preprocess.scale:
        preprocess.set_scale(moments_x.mean_g[keep], moments_x.var_g[keep])
    return preprocess
