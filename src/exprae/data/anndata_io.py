"""Reading and checking AnnData: the input matrix (X, a layer or raw), its values, and count targets."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from exprae.data.preprocessing import Preprocessing
from exprae.errors import DataError, DataFileNotFoundError, MissingKeyError

# ---------------------------------------------------------------- reading and checking


def read_h5ad_header(path: str | Path) -> Path:
    """Check that ``path`` is an existing HDF5 file (what an ``.h5ad`` is); return it expanded."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataFileNotFoundError(f"data file {path} does not exist")
    if path.is_dir():
        raise DataError(f"data path {path} is a directory, expected an .h5ad file")
    try:
        with path.open("rb") as f:
            magic = f.read(8)
    except OSError as e:
        raise DataError(f"data file {path} cannot be read: {e.strerror or e}") from e
    if magic != b"\x89HDF\r\n\x1a\n":
        raise DataError(f"{path} is not an .h5ad file (not HDF5); write one with adata.write_h5ad()")
    return path


def read_h5ad(path: str | Path) -> ad.AnnData:
    """Read an ``.h5ad`` file, turning a missing, foreign or corrupt file into an error that names it."""
    path = read_h5ad_header(path)
    try:
        return ad.read_h5ad(path)
    except Exception as e:  # h5py/anndata raise many types for truncated or damaged files
        keys = _hdf5_keys(path)
        if keys is not None and not {"X", "obs", "var"} <= set(keys):
            raise DataError(
                f"{path} is an HDF5 file but not an AnnData .h5ad (top-level keys {keys[:8]}); a 10x Genomics "
                ".h5 is read with scanpy.read_10x_h5() and saved with adata.write_h5ad()"
            ) from e
        raise DataError(f"{path} could not be read as AnnData (truncated or corrupt?): {e}") from e


def _hdf5_keys(path: Path) -> list[str] | None:
    """Top-level keys of an HDF5 file, or None if it cannot even be opened."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return list(f.keys())
    except Exception:
        return None


def select_matrix(adata: ad.AnnData, layer: str | None) -> ad.AnnData:
    """An AnnData whose ``X`` is the chosen matrix: ``X`` (None or "X"), ``"raw"`` or a named layer.

    The matrix passes :func:`as_numeric` (a missing ``X`` names the layers there are; booleans, integers and
    float16 become float32), so training, streaming and prediction all read the same numbers.
    """
    if layer in (None, "X"):
        return ad.AnnData(
            X=as_numeric(adata.X, what="X", adata=adata),
            obs=adata.obs.copy(),
            var=pd.DataFrame(index=adata.var_names.copy()),
            layers=dict(adata.layers),
        )
    if layer == "raw":
        if adata.raw is None:
            raise DataError("data.layer='raw' was requested but this AnnData has no .raw")
        return ad.AnnData(
            X=as_numeric(adata.raw.X, what="raw.X", adata=adata),
            obs=adata.obs.copy(),
            var=pd.DataFrame(index=adata.raw.var_names.copy()),
        )
    if layer not in adata.layers:
        raise MissingKeyError(
            f"layer {layer!r} not found; available layers: {list(adata.layers) or 'none'} "
            "(or use data.layer=X / data.layer=raw)"
        )
    return ad.AnnData(
        X=as_numeric(adata.layers[layer], what=f"layer {layer!r}", adata=adata),
        obs=adata.obs.copy(),
        var=pd.DataFrame(index=adata.var_names.copy()),
        layers={k: v for k, v in adata.layers.items() if k != layer},
    )


def as_numeric(x: Any, *, what: str, adata: ad.AnnData | None = None) -> np.ndarray | sp.spmatrix:
    """``x`` as a float matrix: float32/64 as stored; bool, integer and float16 as float32; else an error.

    scanpy's normalize_total and log1p fail on booleans with a casting error deep in numpy, and integer
    counts would be normalised in integer arithmetic by some code paths; float16 overflows at 65504.
    """
    if x is None:
        raise matrix_is_none(what, layers=list(adata.layers) if adata is not None else [])
    if not (sp.issparse(x) or isinstance(x, np.ndarray)):
        try:
            x = np.asarray(x)  # h5py datasets, matrices, array-likes
        except Exception as e:
            raise DataError(f"{what} is a {type(x).__name__}, which exprae cannot read as a matrix: {e}") from e
    kind = x.dtype.kind
    if kind == "f" and x.dtype.itemsize >= 4:
        return x
    if kind in "biuf":
        return x.astype(np.float32)
    raise DataError(f"{what} holds values of dtype {x.dtype}, not numbers; expected a float or integer matrix")


def matrix_is_none(what: str, *, layers: list[str]) -> DataError:
    """The error for a chosen matrix that is not stored (``X`` None), naming the layers to choose instead."""
    hint = f"; choose one with data.layer=<name> (layers here: {layers})" if layers else " and it has no layers"
    return DataError(f"the AnnData's {what} is None (no matrix stored){hint}")


def matrix_name(layer: str | None) -> str:
    """The input matrix as messages name it: ``X``, ``raw`` or the layer."""
    return "X" if layer in (None, "X") else layer


def check_names(obs_names: pd.Index, var_names: pd.Index, *, what: str) -> None:
    """Refuse duplicated cell or gene names: genes are matched by name, and split.csv names cells."""
    for names, kind, fix in ((var_names, "gene", "var_names"), (obs_names, "cell", "obs_names")):
        if not names.is_unique:
            dup = names[names.duplicated()].unique()[:5].tolist()
            raise DataError(f"{what} has duplicated {kind} names, e.g. {dup}; run adata.{fix}_make_unique()")


def _positions(csr: sp.csr_matrix | None, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each flagged value: of a CSR matrix's stored values, or of a dense matrix's entries."""
    if csr is None:
        return np.nonzero(mask)
    return np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))[mask], csr.indices[mask]


def check_matrix(
    x: np.ndarray | sp.spmatrix,
    *,
    obs_names: Sequence[str],
    var_names: Sequence[str],
    nonnegative: bool,
    what: str = "data",
) -> None:
    """Refuse NaN/inf, values beyond float32 (and negatives where asked), naming how many and where.

    The model computes in float32, so a float64 value above float32's largest (3.4e38) would become inf
    after the checks; it is refused here as if it already were.
    """
    csr = sp.csr_matrix(x) if sp.issparse(x) else None
    values = csr.data if csr is not None else np.asarray(x)
    finite = np.isfinite(values)
    problems = [("NaN or infinite", ~finite)]
    if values.dtype.itemsize > 4 and values.dtype.kind == "f":
        problems.append(("too large for float32 (|x| > 3.4e38)", finite & (np.abs(values) > np.finfo(np.float32).max)))
    if nonnegative:
        problems.append(("negative", finite & (values < 0)))
    for label, mask in problems:
        if not mask.any():
            continue
        rows, cols = _positions(csr, mask)
        cells = list(dict.fromkeys(np.asarray(obs_names)[rows[:50]]))[:3]
        genes = list(dict.fromkeys(np.asarray(var_names)[cols[:50]]))[:3]
        hint = " (log1p/normalize_total need non-negative values)" if label == "negative" else ""
        raise DataError(
            f"{what} has {int(mask.sum())} {label} values{hint}, in {len(np.unique(rows))} cells and "
            f"{len(np.unique(cols))} genes; first cells {cells}, first genes {genes}"
        )


COUNT_LOSS_HINT = (
    "count likelihoods (poisson, nb, zinb) need raw integer counts: point data.target_layer at a layer of raw "
    "counts (e.g. data.target_layer=counts), or use an expression loss such as loss=mse"
)


def check_counts(
    x: np.ndarray | sp.spmatrix,
    *,
    obs_names: Sequence[str],
    var_names: Sequence[str],
    what: str,
    hint: str = COUNT_LOSS_HINT,
) -> None:
    """Refuse a matrix that is not raw counts (NaN/inf, negative or non-integer values); ``hint`` says why it must be."""
    csr = sp.csr_matrix(x) if sp.issparse(x) else None
    values = csr.data if csr is not None else np.asarray(x)
    finite = np.isfinite(values)
    for label, mask in (
        ("NaN or infinite", ~finite),
        ("negative", finite & (values < 0)),
        ("non-integer", finite & (values != np.round(values))),
    ):
        if not mask.any():
            continue
        rows, cols = _positions(csr, mask)
        example = values[mask][0]
        raise DataError(
            f"{what} has {int(mask.sum())} {label} values (e.g. {example:g} in cell {np.asarray(obs_names)[rows[0]]!r}, "
            f"gene {np.asarray(var_names)[cols[0]]!r}); {hint}"
        )


def _row_sums(x: np.ndarray | sp.spmatrix) -> np.ndarray:
    return np.asarray(x.sum(axis=1), dtype=np.float64).ravel()


def _all_zero(x: np.ndarray | sp.spmatrix, *, axis: int) -> np.ndarray:
    """Rows (axis=1) or columns (axis=0) whose entries are all zero, explicit stored zeros included."""
    return np.asarray(abs(x).sum(axis=axis)).ravel() == 0


# ---------------------------------------------------------------- the input as a whole


def check_input(adata: ad.AnnData, *, nonnegative: bool, what: str) -> None:
    """Refuse an empty matrix, duplicated names and bad values (:func:`check_matrix`) before anything is fitted."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise DataError(f"{what} is empty: {adata.n_obs} cells x {adata.n_vars} genes")
    check_names(adata.obs_names, adata.var_names, what=what)
    check_matrix(adata.X, obs_names=adata.obs_names, var_names=adata.var_names, nonnegative=nonnegative, what=what)


def warn_empty_cells(adata: ad.AnnData, *, what: str, stacklevel: int = 2) -> None:
    """Warn about cells whose profile is all zero: their cosine is defined as 0, which a user should know."""
    empty = _all_zero(adata.X, axis=1)
    if empty.any():
        warnings.warn(
            f"{what}: {int(empty.sum())} cells have all-zero profiles, e.g. {list(adata.obs_names[empty][:3])}; "
            "their cosine is defined as 0, so the loss and metrics stay finite",
            stacklevel=stacklevel + 1,
        )


def warn_silent_genes(
    silent: pd.Index, preprocess: Preprocessing, *, n_genes: int, what: str, stacklevel: int = 3
) -> None:
    """Warn about genes zero in every cell that the model keeps, with advice that fits the gene selection.

    Zero genes that highly-variable-gene selection drops cost nothing, so they are not mentioned.
    """
    kept = silent[silent.isin(preprocess.genes)]
    if kept.empty:
        return
    n_top = preprocess.n_top_genes
    if n_top is None:
        advice = "keep highly variable genes with data.preprocess.n_top_genes=2000 (for example) or filter them out"
    else:
        advice = (
            f"data.preprocess.n_top_genes={n_top} keeps them ({n_genes} genes present"
            + (", so all are kept" if n_top >= n_genes else "; more are asked for than vary")
            + "): lower n_top_genes or filter them out"
        )
    warnings.warn(
        f"{what}: {len(kept)} genes are zero in every cell, e.g. {list(kept[:3])}; they carry no signal "
        f"({advice}, e.g. sc.pp.filter_genes(adata, min_cells=1))",
        stacklevel=stacklevel,
    )
