"""Molecular cross-validation's molecule split: every count becomes two independent halves by binomial thinning.

Batson, Royer & Webber (2019), "Molecular Cross-Validation for Single-Cell RNA-seq": each observed count
``x`` is split into ``x' ~ Binomial(x, p)`` and ``x'' = x - x'``. Under Poisson sampling of molecules the two
halves are independent given the cell's true expression, so a model trained on ``x'`` alone can be scored
against ``x''``: the expected held-out loss is minimised by the true expression, not by the noisy ``x'``.

The draw of each cell depends only on ``(seed, the cell's row in the file)``: one generator per cell,
drawing for the cell's nonzero counts in gene order. The split is therefore the same whatever the batch
size, the batch order, the device, and whether the matrix is read whole or streamed from disk in chunks.
Sparse in, sparse out; a matrix that is not raw counts is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp

from exprae.data.anndata_io import check_counts
from exprae.errors import ConfigError

# The MCV scores compare a reconstruction of x' with x'' directly; that is unbiased only when both halves are
# equally deep (p = 1/2). Another p needs the paper's depth correction of every score, not implemented here.
SCORED_FRACTION = 0.5


@dataclass
class MoleculeSplit:
    """``data.mcv``: the fraction ``p`` of molecules the model sees (``None``: MCV off) and the split's seed."""

    fraction: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.fraction is None:
            return
        if not 0.0 < float(self.fraction) < 1.0:
            raise ConfigError(f"data.mcv.fraction must lie strictly between 0 and 1 (0.5 for MCV), got {self.fraction}")
        if float(self.fraction) != SCORED_FRACTION:
            raise ConfigError(
                f"data.mcv.fraction={self.fraction} is not supported: the MCV scores compare a reconstruction of the "
                "training half x' directly with the held-out half x'', which is unbiased only when both halves are "
                "equally deep (fraction=0.5); other fractions need the depth correction of Batson et al. (2019), "
                "which exprae does not implement"
            )
        self.fraction = float(self.fraction)

    @property
    def enabled(self) -> bool:
        return self.fraction is not None

    @property
    def depth_ratio(self) -> float:
        """``(1 - p) / p``: expected held-out counts per expected training count."""
        return (1.0 - self.fraction) / self.fraction

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)

    def split(
        self,
        x_ng: np.ndarray | sp.spmatrix,
        rows_n: np.ndarray,
        *,
        what: str,
        obs_names: Sequence[str],
        var_names: Sequence[str],
    ) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """``(x', x'')`` of raw counts ``x_ng`` whose file rows are ``rows_n``; refuses a matrix of non-counts."""
        check_counts(
            x_ng,
            obs_names=obs_names,
            var_names=var_names,
            what=what,
            hint="molecular cross-validation (data.mcv) splits raw integer counts: point data.layer at raw counts",
        )
        train = thin(x_ng, rows_n, fraction=self.fraction, seed=self.seed)
        held_out = (sp.csr_matrix(x_ng, dtype=np.float32) - train).tocsr()
        held_out.eliminate_zeros()
        return train, held_out


def thin(x_ng: np.ndarray | sp.spmatrix, rows_n: np.ndarray, *, fraction: float, seed: int) -> sp.csr_matrix:
    """``x' ~ Binomial(x, fraction)`` entrywise; row ``i`` drawn by a generator seeded with ``(seed, rows_n[i])``.

    Draws are made for the nonzero counts of a row in increasing gene order, so a dense matrix, a CSR matrix
    with unsorted indices or explicit zeros, and any slice of rows all give the same ``x'`` for a cell.
    """
    csr = sp.csr_matrix(x_ng, copy=True)  # a copy: zeros are dropped and indices sorted in place
    csr.eliminate_zeros()
    csr.sort_indices()
    if len(rows_n) != csr.shape[0]:
        raise ValueError(f"{len(rows_n)} row numbers for a matrix of {csr.shape[0]} rows")
    counts = np.rint(csr.data).astype(np.int64)
    out = np.empty(len(counts), dtype=np.float32)
    indptr = csr.indptr
    for i, row in enumerate(rows_n):
        lo, hi = indptr[i], indptr[i + 1]
        if hi > lo:  # pragma: no mutate (an empty row draws nothing either way; this only skips a generator)
            out[lo:hi] = np.random.default_rng([int(seed), int(row)]).binomial(counts[lo:hi], fraction)
    thinned = sp.csr_matrix((out, csr.indices.copy(), indptr.copy()), shape=csr.shape)
    thinned.eliminate_zeros()
    return thinned
