"""New data aligned to a trained model: its matrix chosen and checked, genes matched by name, rows preprocessed.

A model remembers its data contract (genes in order, matrix, fitted preprocessing). New cells are matched to
it by gene name, never by position: a gene the model was trained on and the data lacks is an error that names
it (or, opted into, a zero-filled column with a warning), and the run's saved preprocessing is replayed on
row blocks so sparse data is densified one batch at a time.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from exprae.data import check_matrix, check_names, select_matrix
from exprae.errors import DataError

if TYPE_CHECKING:
    from exprae.inference.load import ExpraeModel

_SHOWN = 20  # gene names quoted in a message


class GeneMismatchError(DataError):
    """The data lacks genes the model was trained on."""


class InputMatrix:
    """The chosen matrix of new data, its gene alignment to the model, and per-row-block preprocessing."""

    def __init__(
        self,
        model: ExpraeModel,
        x: np.ndarray | sp.spmatrix,
        *,
        obs_names: pd.Index,
        var_names: pd.Index,
        layer: str,
        allow_missing_genes: bool,
        nonnegative: bool | None = None,
    ) -> None:
        check_names(obs_names, var_names, what=f"the data ({layer})")
        genes = pd.Index(model.var_names)
        self.missing = [str(g) for g in genes[~genes.isin(var_names)]]
        if len(self.missing) == len(genes):  # zero-filling everything would embed nothing but zeros
            raise GeneMismatchError(
                f"none of the {len(genes)} genes the model was trained on is in the data ({layer}; its genes start "
                f"{list(var_names[:5])}, the model's {list(genes[:5])}): another organism or gene annotation "
                "(symbols vs Ensembl ids)?"
            )
        if self.missing and not allow_missing_genes:
            raise GeneMismatchError(
                f"{len(self.missing)} of the {len(genes)} genes the model was trained on are missing from the data "
                f"({layer}): {', '.join(self.missing[:_SHOWN])}{', ...' if len(self.missing) > _SHOWN else ''}. "
                "Use data with the same gene names (e.g. the same annotation), or pass allow_missing_genes=True "
                "to fill them with zeros (a warning says how many)."
            )
        if self.missing:
            warnings.warn(
                f"{len(self.missing)} of the model's {len(genes)} genes are missing from the data and were filled "
                f"with zeros (first: {', '.join(self.missing[:5])}); per-cell metrics use the {len(genes) - len(self.missing)} "
                "genes present, but latents and reconstructions of these cells are less reliable",
                UserWarning,
                stacklevel=4,  # the user's embed()/transform() call
            )
        self.present_g = ~genes.isin(self.missing)
        model.preprocess.check_library_genes(var_names, allow_missing=allow_missing_genes, what=f"the data ({layer})")
        # normalize_total sums over every gene of the data, so its NaNs matter even outside the model's genes.
        if model.preprocess.normalize_total is not None:
            used = np.arange(len(var_names))
        else:
            used = var_names.get_indexer(genes[self.present_g])
        x = sp.csr_matrix(x) if sp.issparse(x) and x.format != "csr" else x  # row blocks are cheap from CSR
        check_matrix(
            x[:, used] if len(used) < len(var_names) else x,
            obs_names=obs_names,
            var_names=var_names[used],
            nonnegative=model.preprocess.needs_nonnegative if nonnegative is None else nonnegative,
            what=f"data ({layer})",
        )
        self.model, self.x, self.obs_names, self.var_names, self.layer = model, x, obs_names, var_names, layer
        self._model_columns = var_names.get_indexer(genes[self.present_g])

    @classmethod
    def from_adata(
        cls,
        model: ExpraeModel,
        adata: ad.AnnData,
        *,
        layer: str | None,
        allow_missing_genes: bool,
        nonnegative: bool | None = None,
    ) -> InputMatrix:
        """Select the matrix (``layer=None``: the one the model was trained on) and check it."""
        layer = model.layer if layer is None else layer
        selected = select_matrix(adata, layer)
        return cls(
            model,
            selected.X,
            obs_names=adata.obs_names,
            var_names=selected.var_names,
            layer="X" if layer in (None, "X") else layer,
            allow_missing_genes=allow_missing_genes,
            nonnegative=nonnegative,
        )

    def _block(self, rows: np.ndarray) -> np.ndarray | sp.spmatrix:
        block = self.x[rows]
        return block.astype(np.float32) if sp.issparse(block) else np.asarray(block, dtype=np.float32)

    def preprocessed(self, rows: np.ndarray) -> ad.AnnData:
        """Rows ``rows`` with missing genes zero-filled (before preprocessing, as unmeasured counts) and the
        saved preprocessing applied; the result's genes are the model's, in its order."""
        block = self._block(rows)
        var_names = self.var_names
        if self.missing:
            zeros = np.zeros((block.shape[0], len(self.missing)), dtype=np.float32)
            block = (
                sp.hstack([block, sp.csr_matrix(zeros)], format="csr")
                if sp.issparse(block)
                else np.hstack([block, zeros])
            )
            var_names = var_names.append(pd.Index(self.missing))
        chunk = ad.AnnData(X=block, obs=pd.DataFrame(index=self.obs_names[rows]), var=pd.DataFrame(index=var_names))
        return self.model.preprocess.transform(chunk)

    def size_factors(self, rows: np.ndarray) -> np.ndarray:
        """The factor ``normalize_total`` applied to each of these cells (over all the data's genes, as in training)."""
        return self.model.preprocess.size_factor(self._block(rows))

    def model_gene_totals(self, rows: np.ndarray) -> np.ndarray:
        """Each cell's total over the model's genes (missing ones count 0): the library size of a count model."""
        block = self._block(rows)[:, self._model_columns]
        return np.asarray(block.sum(axis=1), dtype=np.float32).ravel()
