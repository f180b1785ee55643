"""What the model is fitted and scored against, kept as layers beside the input: the target, x'' and the truth.

Each function here adds to the preprocessed AnnData of all cells (``adata``, the genes already chosen) what the
loss or a score compares with: a separate target matrix (raw counts for count likelihoods, or another matrix
preprocessed like the input), the molecules MCV held out (x''), and the noise-free truth of synthetic data.
``full`` is the AnnData as the user has it; ``selected`` its input matrix before preprocessing (under MCV: x').
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from exprae.constants import EXPECTED_TRUTHS, MCV_COUNTS_KEY, MCV_TARGET_KEY, TRUTH_KEY
from exprae.data.anndata_io import _row_sums, check_counts, check_matrix, matrix_name, select_matrix
from exprae.data.mcv import MoleculeSplit
from exprae.data.preprocessing import Preprocessing
from exprae.data.truth import expected_truths
from exprae.errors import ConfigError, MissingKeyError

# Where a separate target (gene-subset, per split by slicing) and its per-cell scalars are kept.
TARGET_LAYER = "exprae_target"
LIBRARY_OBS = "exprae_library_size"
SIZE_FACTOR_OBS = "exprae_size_factor"
# data.mcv: the held-out molecules x'' (preprocessed like the input; raw counts on the kept genes), scoring only.
MCV_LAYERS = {MCV_TARGET_KEY: "exprae_mcv_target", MCV_COUNTS_KEY: "exprae_mcv_counts"}
SCORED_LAYERS = {**MCV_LAYERS, **{key: key for key in EXPECTED_TRUTHS.values()}}  # validation/test cells only


def attach_layers(
    adata: ad.AnnData,
    full: ad.AnnData,
    selected: ad.AnnData,
    *,
    held_out: sp.csr_matrix | None,
    held_out_rows: np.ndarray,
    layer: str | None,
    target_layer: str | None,
    count_target: bool,
    preprocess: Preprocessing,
    mcv: MoleculeSplit,
    source: str,
) -> None:
    """Attach what this run compares with: gene annotations, the target, x'' (``held_out``) and the truths.

    ``held_out_rows`` are the validation and test cells, the only ones the expected truths are sampled for.
    """
    copy_gene_annotations(adata, full)
    if count_target or target_layer is not None:
        attach_target(
            adata,
            full,
            selected,
            layer=layer,
            target_layer=target_layer,
            count_target=count_target,
            preprocess=preprocess,
            mcv=mcv,
            source=source,
        )
    if held_out is not None:
        attach_held_out(adata, held_out, selected, preprocess=preprocess)
    if TRUTH_KEY in full.layers and matrix_name(layer) == "X":
        attach_truth(adata, full, selected, preprocess=preprocess, mcv=mcv, held_out_rows=held_out_rows)


def attach_target(
    adata: ad.AnnData,
    full: ad.AnnData,
    selected: ad.AnnData,
    *,
    layer: str | None,
    target_layer: str | None,
    count_target: bool,
    preprocess: Preprocessing,
    mcv: MoleculeSplit,
    source: str,
) -> None:
    """Keep the target for the kept genes: raw counts (count likelihoods) or preprocessed like the input."""
    name = target_layer if target_layer is not None else matrix_name(layer)
    matrix = selected if target_layer in (None, layer) else select_matrix(full, target_layer)
    if mcv.enabled and matrix is not selected:
        check_mcv_target(matrix, full, layer=layer, target_layer=target_layer, source=source)
        matrix = selected  # the same raw counts, thinned: the target is x' too
    what = f"data.target_layer={name!r} of {source}"
    if target_layer is None:
        what = f"the count target {name!r} of {source} (data.target_layer unset: the input's own matrix)"
    genes = adata.var_names
    missing = genes.difference(matrix.var_names)
    if len(missing):
        raise MissingKeyError(f"{what} lacks {len(missing)} of the input's genes, e.g. {list(missing[:5])}")
    if not count_target:
        check_matrix(
            matrix.X,
            obs_names=matrix.obs_names,
            var_names=matrix.var_names,
            nonnegative=preprocess.needs_nonnegative,
            what=what,
        )
        adata.layers[TARGET_LAYER] = preprocess.transform(matrix).X
        return
    counts = matrix[:, genes].X
    check_counts(counts, obs_names=matrix.obs_names, var_names=genes, what=what)
    adata.layers[TARGET_LAYER] = counts
    adata.obs[LIBRARY_OBS] = _row_sums(counts).astype(np.float32)
    adata.obs[SIZE_FACTOR_OBS] = preprocess.size_factor(selected.X)


def check_mcv_target(
    target: ad.AnnData, full: ad.AnnData, *, layer: str | None, target_layer: str | None, source: str
) -> None:
    """Under MCV a separate target layer must hold the input's own counts, else its x'' would not be held out."""
    original = select_matrix(full, layer).X
    same = target.shape == original.shape and (target.var_names == full.var_names).all()
    if same:
        diff = sp.csr_matrix(target.X, dtype=np.float64) - sp.csr_matrix(original, dtype=np.float64)
        same = diff.count_nonzero() == 0
    if not same:
        raise ConfigError(
            f"data.mcv splits the molecules of the input {matrix_name(layer)!r} of {source}, but "
            f"data.target_layer={target_layer!r} is a different matrix whose molecules would not be split; "
            "with data.mcv set the target must be the input's counts (unset data.target_layer)"
        )


def attach_held_out(
    adata: ad.AnnData, held_out: sp.csr_matrix, selected: ad.AnnData, *, preprocess: Preprocessing
) -> None:
    """Keep x'' for scoring: preprocessed like the input (by its own total), and as counts on the kept genes."""
    block = ad.AnnData(X=held_out, obs=selected.obs[[]], var=pd.DataFrame(index=selected.var_names))
    adata.layers[MCV_LAYERS[MCV_TARGET_KEY]] = preprocess.transform(block).X
    adata.layers[MCV_LAYERS[MCV_COUNTS_KEY]] = block[:, adata.var_names].X.tocsr()
    if SIZE_FACTOR_OBS not in adata.obs:  # the count score maps expression back to x' counts with it
        adata.obs[SIZE_FACTOR_OBS] = preprocess.size_factor(selected.X)


def attach_truth(
    adata: ad.AnnData,
    full: ad.AnnData,
    selected: ad.AnnData,
    *,
    preprocess: Preprocessing,
    mcv: MoleculeSplit,
    held_out_rows: np.ndarray,
) -> None:
    """Keep the noise-free truth (``layers["true_mean"]`` of synthetic data) preprocessed like the input, and the
    expected truths ``E[T(x)]`` (:mod:`exprae.data.truth`) of the held-out cells ``held_out_rows``."""
    # Under MCV the model sees x', whose expectation is p times the truth (it matters without normalisation).
    truth_ng = full.layers[TRUTH_KEY] * (mcv.fraction if mcv.enabled else 1.0)
    truth = ad.AnnData(X=truth_ng, obs=selected.obs[[]], var=pd.DataFrame(index=selected.var_names))
    adata.layers[TRUTH_KEY] = preprocess.transform(truth).X
    # E[T(x)] (of x'' under MCV), what the models and the MCV score estimate, on the scored cells.
    depth = 1.0 - mcv.fraction if mcv.enabled else 1.0
    adata.layers.update(expected_truths(full, preprocess, rows=held_out_rows, depth=depth))


def copy_gene_annotations(adata: ad.AnnData, full: ad.AnnData) -> None:
    """Carry the user's gene annotations (e.g. synthetic data's ``true_dispersion``) over to the kept genes."""
    for col in full.var.columns.difference(adata.var.columns):
        adata.var[col] = full.var[col].reindex(adata.var_names).to_numpy()
