"""scanpy preprocessing whose fitted state is recorded, so new data can be transformed identically.

The per-cell steps (``expm1``, ``normalize_total``, ``log1p``) are stateless. The steps that learn from data (the
highly-variable-gene list, the per-gene scaling means and stds) are fitted on the training cells only, so
held-out cells never leak into the model, and saved with the run for ``exprae-predict``.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from exprae.errors import ConfigError, DataError


def keeps_all_genes(n_top_genes: int, n_genes: int) -> bool:
    """True (with a warning, as scanpy does) when fewer genes are present than ``n_top_genes`` asks for."""
    if n_top_genes < n_genes:
        return False
    if n_top_genes > n_genes:
        warnings.warn(
            f"preprocess.n_top_genes={n_top_genes} asks for more genes than the {n_genes} present: all {n_genes} "
            "are kept (scanpy's convention); set data.preprocess.n_top_genes=null to keep all genes silently",
            stacklevel=3,
        )
    return True


@dataclass
class Preprocessing:
    """Which scanpy steps to run, in scanpy's order; fitted state is filled in by :meth:`fit`.

    ``expm1`` runs first and undoes a ``log1p`` already applied to the data: ``expm1`` on pbmc68k's
    log-normalised ``raw`` gives the library-size-normalised expression without the log.
    """

    expm1: bool = False  # exp(x) − 1 before anything else: log-normalised data back to normalised values
    normalize_total: float | None = None  # target sum per cell (e.g. 1e4); None: off
    log1p: bool = False
    n_top_genes: int | None = None  # highly variable genes kept; None: all genes
    hvg_flavor: Literal["seurat", "cell_ranger", "seurat_v3", "seurat_v3_paper"] = "seurat"  # scanpy's flavors
    scale: bool = False  # zero mean, unit variance per gene (train-cell statistics)
    max_value: float | None = None  # clip after scaling, as sc.pp.scale
    genes: list[str] | None = field(default=None, repr=False)  # fitted: genes kept
    # fitted with normalize_total: the genes each cell's library size summed over at training (all input genes)
    library_genes: list[str] | None = field(default=None, repr=False)
    scale_mean: list[float] | None = field(default=None, repr=False)  # fitted
    scale_std: list[float] | None = field(default=None, repr=False)  # fitted

    def __post_init__(self) -> None:
        if self.normalize_total is not None and not self.normalize_total > 0:
            raise ConfigError(f"preprocess.normalize_total must be positive or null, got {self.normalize_total}")
        if self.n_top_genes is not None and int(self.n_top_genes) < 1:
            raise ConfigError(f"preprocess.n_top_genes must be a positive integer or null, got {self.n_top_genes}")
        if self.max_value is not None and not self.max_value > 0:
            raise ConfigError(f"preprocess.max_value must be positive or null, got {self.max_value}")

    @property
    def needs_nonnegative(self) -> bool:
        return self.expm1 or self.normalize_total is not None or self.log1p

    def per_cell(self, adata: ad.AnnData) -> ad.AnnData:
        """expm1, normalize_total and log1p (stateless), on a copy."""
        import scanpy as sc

        adata = adata.copy()
        if self.expm1:
            # In place on the stored values: expm1(0) = 0, so a sparse matrix keeps its pattern.
            if sp.issparse(adata.X):
                adata.X.data = np.expm1(adata.X.data)
            else:
                adata.X = np.expm1(np.asarray(adata.X))
        if self.normalize_total is not None:
            sc.pp.normalize_total(adata, target_sum=float(self.normalize_total))
        if self.log1p:
            sc.pp.log1p(adata)
        return adata

    def size_factor(self, x_ng: np.ndarray | sp.spmatrix) -> np.ndarray:
        """The per-cell factor ``normalize_total`` multiplies raw rows by (1 without it; 0 for an empty cell)."""
        if self.normalize_total is None:
            return np.ones(x_ng.shape[0], dtype=np.float32)
        totals = np.asarray(x_ng.sum(axis=1), dtype=np.float64).ravel()
        factor = np.divide(float(self.normalize_total), totals, out=np.zeros_like(totals), where=totals > 0)
        return factor.astype(np.float32)

    def fit(self, adata: ad.AnnData) -> Preprocessing:
        """Learn the gene list and scaling statistics from ``adata`` (training cells, after per_cell)."""

        genes = list(adata.var_names)
        if self.normalize_total is not None:
            self.library_genes = list(genes)
        if self.n_top_genes is not None and not keeps_all_genes(int(self.n_top_genes), adata.n_vars):
            genes = _highly_variable(adata, n_top_genes=int(self.n_top_genes), flavor=self.hvg_flavor)
        self.genes = genes
        if self.scale:
            x = adata[:, genes].X
            mean = np.asarray(x.mean(axis=0)).ravel().astype(np.float64)
            sq = x.multiply(x).mean(axis=0) if sp.issparse(x) else np.square(x).mean(axis=0)
            var = np.asarray(sq).ravel() - mean**2
            self.set_scale(mean, var * adata.n_obs / max(adata.n_obs - 1, 1))
        return self

    def set_scale(self, mean_g: np.ndarray, var_g: np.ndarray) -> None:
        """Record scaling statistics of the kept genes from their mean and unbiased variance."""
        std = np.sqrt(np.clip(np.asarray(var_g, dtype=np.float64), 0, None))
        zero = std == 0
        if zero.any():
            names = ", ".join(np.asarray(self.genes)[zero][:5])
            warnings.warn(
                f"{int(zero.sum())} genes have zero variance in the training cells ({names}, ...); "
                "scaling leaves them centred at 0 instead of dividing by 0",
                stacklevel=3,
            )
        std[zero] = 1.0
        self.scale_mean, self.scale_std = np.asarray(mean_g, dtype=np.float64).tolist(), std.tolist()

    def transform(self, adata: ad.AnnData) -> ad.AnnData:
        """Apply the fitted steps: per-cell steps, gene subset, scaling (sparse stays sparse unless scaled)."""
        if self.genes is None:
            raise RuntimeError("Preprocessing.transform called before fit")
        if self.library_genes is not None:
            # Library sizes sum over the genes they summed over at training; a gene the training data did not
            # have would change every cell's size (see check_library_genes for genes missing now).
            counted = adata.var_names.isin(self.library_genes)
            if not counted.all():
                adata = adata[:, counted]
        adata = self.per_cell(adata)
        adata = adata[:, self.genes].copy()
        if self.scale:
            x = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X, dtype=np.float64)
            x = (x - np.asarray(self.scale_mean)) / np.asarray(self.scale_std)
            if self.max_value is not None:
                x = np.clip(x, -self.max_value, self.max_value)
            adata.X = x.astype(np.float32)
        return adata

    def check_library_genes(self, var_names: pd.Index, *, allow_missing: bool, what: str) -> list[str]:
        """The library-size genes missing from ``var_names``; refused unless ``allow_missing`` (then a warning).

        normalize_total divides each cell by its total over the genes it was trained with. Data cut down to
        fewer genes (e.g. only the model's highly variable genes) has smaller totals, so every cell would be
        scaled up and shifted in the latent space, with no error.
        """
        if self.library_genes is None:
            return []
        present = set(var_names)  # once: rebuilt per gene, 33,694 genes took ~10 minutes
        missing = [g for g in self.library_genes if g not in present]
        if not missing:
            return []
        message = (
            f"{what} lacks {len(missing)} of the {len(self.library_genes)} genes the model's normalize_total summed "
            f"each cell's library size over at training (e.g. {missing[:5]}); library sizes over fewer genes are "
            "smaller, so every cell would be scaled differently from training"
        )
        if not allow_missing:
            raise DataError(
                f"{message}. Pass the matrix with all its genes (not only the model's), or allow_missing_genes=true "
                "to normalise over the genes present"
            )
        warnings.warn(f"{message}; normalising over the {len(self.library_genes) - len(missing)} present", stacklevel=3)
        return missing

    def to_dict(self) -> dict[str, Any]:
        """Plain-data record of the settings and fitted state (JSON-serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(**d)

    def settings(self) -> dict[str, Any]:
        """The settings alone, without fitted state: what two runs must share to be comparable."""
        d = self.to_dict()
        for k in ("genes", "library_genes", "scale_mean", "scale_std"):
            d.pop(k)
        return d


def _highly_variable(adata: ad.AnnData, *, n_top_genes: int, flavor: str) -> list[str]:
    """scanpy's highly variable genes, refusing data with nothing to rank (scanpy fails with an IndexError)."""
    import scanpy as sc

    # Exact, unlike a variance from float32 moments: log1p(normalised constant counts) came out as 100 of 100
    # genes "varying" by rounding, and scanpy then failed with an IndexError.
    lowest, highest = adata.X.min(axis=0), adata.X.max(axis=0)
    if sp.issparse(lowest):
        lowest, highest = lowest.toarray(), highest.toarray()
    varying = int((np.asarray(highest) > np.asarray(lowest)).sum())
    if varying == 0:
        raise DataError(
            f"no gene varies across the {adata.n_obs} training cells (all-zero or constant data), so "
            f"preprocess.n_top_genes={n_top_genes} has nothing to rank; check the input matrix, or set "
            "data.preprocess.n_top_genes=null"
        )
    try:
        hvg = sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor=flavor, inplace=False)
    except (IndexError, ValueError, ZeroDivisionError) as e:
        raise DataError(
            f"highly-variable-gene selection (flavor={flavor!r}, n_top_genes={n_top_genes}) failed on the "
            f"{adata.n_obs} training cells, {varying} of whose {adata.n_vars} genes vary: {e}. Try another "
            "data.preprocess.hvg_flavor, fewer n_top_genes, or n_top_genes=null"
        ) from e
    return list(adata.var_names[hvg["highly_variable"].to_numpy()])
