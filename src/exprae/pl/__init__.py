"""Plotting, scanpy style (``exprae.pl.cosine_distribution(adata)``): figures of an AnnData written by ``embed``."""

from exprae.pl.plots import (
    best_median_worst,
    cosine_by_group,
    cosine_distribution,
    gene_r_vs_mean,
    marker_genes,
    reconstruction,
    select_cells,
)

__all__ = [
    "best_median_worst",
    "cosine_by_group",
    "cosine_distribution",
    "gene_r_vs_mean",
    "marker_genes",
    "reconstruction",
    "select_cells",
]
