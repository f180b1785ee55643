"""``exprae.embed``: run a trained module's own prediction on an AnnData; write results where scanpy users look.

Each row block of the data is aligned to the model's genes and preprocessed as in training
(:mod:`exprae.inference.align`), then passed through the module's ``predict_step``, the same code that
scores held-out cells during training, so every loss is applied the same way, count likelihoods included.

The model works in its *preprocessed gene space*: the contract's genes (the highly variable subset when the
run used ``n_top_genes``), after the run's normalisation, log and scaling. ``embed`` therefore writes

* ``obsm["X_{key}"]``: the latent code of every cell;
* ``layers["{key}_recon"]`` (the model covers every gene) or ``obsm["{key}_recon"]`` (the model's genes only,
  named in ``uns["{key}"]["recon_var_names"]``): the reconstruction, in the preprocessed space (not counts);
  see :mod:`exprae.inference.outputs` for the layouts and ``recon="none"`` to skip it. For a count likelihood (``loss=poisson|nb|zinb``) this is the expected counts
  mapped into the input's representation (normalised, log1p'd and scaled like the input), as the module
  scores it during training;
* ``{key}_expected_counts`` (count likelihoods only, in the reconstruction's layout): the expected counts, the
  distribution's mean ``(1 - pi) · mu`` at each cell's observed library size (its total counts over the
  model's genes; a learned library where the model has one), in count units. Divide by the library for
  scVI's normalised expression;
* ``obs["{key}_cosine"]``, ``obs["{key}_pearson"]``, ``obs["{key}_mse"]``: per-cell agreement of
  reconstruction and preprocessed input;
* ``obs["{key}_split"]``: each cell's split in the run that trained the model (train / val / test, matched by
  cell name against the run's ``split.csv``; "new" for cells it never saw), so no score over training cells
  passes for a held-out one (:mod:`exprae.inference.splits`);
* ``var["{key}_gene_r"]``: per-gene Pearson r across the cells the model was not trained on (held-out and new;
  across all cells only where every cell is a training cell, as ``uns["{key}"]["gene_r_cells"]`` says); NaN
  outside the model's genes or for a gene constant in these cells;
* ``uns["{key}"]``: the settings, model and gene bookkeeping.

A model trained with ``data.batch_key`` reads each cell's covariate levels from the same obs columns (a level
it was not trained with is an error listing the known ones). ``transform_batch="ctrl"`` writes the
counterfactual reconstruction instead: every cell encoded with its own batch and decoded as if measured in
``ctrl`` (scVI's ``transform_batch``); the per-cell and per-gene scores still compare each cell's own
reconstruction with its input.

``ExpraeModel.transform`` returns the preprocessed input itself, the "true" side of every comparison.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from exprae.constants import (
    BATCH_KEY,
    DEFAULT_KEY,
    EXPECTED_COUNTS_LAYER,
    LATENT_OBSM,
    LIBRARY_KEY,
    RECON_LAYER,
    SIZE_FACTOR_KEY,
    X_KEY,
)
from exprae.data.covariates import level_code, recode
from exprae.errors import ConfigError
from exprae.inference.align import InputMatrix
from exprae.inference.load import ExpraeModel
from exprae.inference.outputs import Recon, check_recon, write_reconstruction
from exprae.inference.representation import WARN as REPRESENTATION_WARN
from exprae.inference.representation import GeneMoments, compare_moments, raw_findings
from exprae.inference.splits import gene_r_cells, split_counts, split_marks
from exprae.runs.output_gate import check_key_name
from exprae.scoring.metrics import per_cell_metrics


def _row_blocks(n: int, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, n, batch_size):
        yield np.arange(start, min(start + batch_size, n))


class _GeneCorrelation:
    """Per-gene Pearson r between two matrices, accumulated over row blocks in float64."""

    def __init__(self, n_genes: int, device: torch.device) -> None:
        self.n = 0
        self.sums = torch.zeros(5, n_genes, dtype=torch.float64, device=device)  # x, y, xx, yy, xy

    def update(self, x_ng: torch.Tensor, y_ng: torch.Tensor) -> None:
        x, y = x_ng.double(), y_ng.double()
        self.n += x.shape[0]
        self.sums += torch.stack([x.sum(0), y.sum(0), (x * x).sum(0), (y * y).sum(0), (x * y).sum(0)])

    def compute(self) -> np.ndarray:
        sx, sy, sxx, syy, sxy = (self.sums / max(self.n, 1)).unbind(0)
        cov = sxy - sx * sy
        var_x, var_y = (sxx - sx * sx).clamp_min(0), (syy - sy * sy).clamp_min(0)
        denom = (var_x * var_y).sqrt()
        # A gene constant across these cells has no correlation to speak of: NaN, not 0. "Constant" is relative
        # to the gene's second moment, since E[x²] − E[x]² of identical values leaves float64 round-off, not 0.
        varies = (var_x > 1e-12 * sxx) & (var_y > 1e-12 * syy)
        r = torch.where(varies, cov / denom.clamp_min(1e-300), torch.full_like(cov, float("nan")))
        return r.clamp(-1, 1).cpu().numpy()


# ---------------------------------------------------------------- embed


def embed(
    model: ExpraeModel,
    adata: ad.AnnData,
    *,
    layer: str | None = None,
    key_added: str = DEFAULT_KEY,
    batch_size: int = 1024,
    allow_missing_genes: bool = False,
    baselines: bool = False,
    transform_batch: str | None = None,
    recon: Recon = "auto",
    copy: bool = False,
) -> ad.AnnData:
    """Encode and reconstruct every cell of ``adata`` with the module's ``predict_step``; write the results.

    ``recon`` places the reconstruction (:mod:`exprae.inference.outputs`): ``"auto"`` a layer when the model
    covers every gene of ``adata``, else ``obsm["{key}_recon"]`` over the model's genes only; ``"layer"``,
    ``"obsm"`` or ``"none"`` (skip it: latent and scores are always written). A count model's expected counts
    follow the same layout.

    ``layer=None`` reads the matrix the model was trained on (its contract's layer); genes are matched by
    name, so their order does not matter. A count model's library sizes come from the same matrix, or from
    the run's ``data.target_layer`` where it trained on another. ``baselines=True`` also writes the per-cell
    cosine of the mean-profile and PCA baselines (``obs["{key}_meanprofile_cosine"]``, ``obs["{key}_pca_cosine"]``).
    A model trained with covariates reads them from ``adata.obs``; ``transform_batch`` (a level of the batch)
    makes ``layers["{key}_recon"]`` the counterfactual: each cell decoded as if from that batch. Returns
    ``adata`` (modified in place) or, with ``copy=True``, a modified copy.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size}")
    check_key_name(key_added, what="key_added")
    check_recon(recon)
    target_code = None if transform_batch is None else level_code(model.batch_categories, transform_batch)
    batch_nk = recode(adata.obs, model.batch_categories, what="the data") if model.batch_categories else None
    adata = adata.copy() if copy else adata
    source = InputMatrix.from_adata(model, adata, layer=layer, allow_missing_genes=allow_missing_genes)
    library_source = _library_source(model, adata, source, allow_missing_genes=allow_missing_genes)
    device = model.device
    present_g = torch.as_tensor(source.present_g, device=device)
    genes = pd.Index(model.var_names)
    # Where each model gene goes in adata's own gene order (-1: not one of adata's genes, e.g. a raw-only gene).
    dest = adata.var_names.get_indexer(genes)
    written = (dest >= 0) & source.present_g
    written_g = torch.as_tensor(written, device=device)

    z_nk = np.empty((adata.n_obs, model.latent_dim), dtype=np.float32)
    # Only the model's genes that are in adata: never a cells x all-genes array of NaN (see outputs).
    n_written = int(written.sum()) if recon != "none" else 0
    outputs = {RECON_LAYER: np.empty((adata.n_obs, n_written), dtype=np.float32)}
    if model.count_model:
        outputs[EXPECTED_COUNTS_LAYER] = np.empty((adata.n_obs, n_written), dtype=np.float32)
    cell = {name: np.empty(adata.n_obs, dtype=np.float32) for name in ("cosine", "pearson", "mse")}
    if baselines:
        cell.update({name: np.empty(adata.n_obs, dtype=np.float32) for name in ("meanprofile_cosine", "pca_cosine")})
    gene_r = _GeneCorrelation(int(present_g.sum()), device)
    moments = GeneMoments(int(present_g.sum()), device)
    findings = raw_findings(source.x[: min(adata.n_obs, batch_size)], model.preprocess.settings())
    splits_n = split_marks(adata.obs_names, model.run_dir)
    # Per-gene r over the cells the model was not trained on (all cells only when every one is a training cell).
    gene_r_rows, gene_r_covers = gene_r_cells(splits_n)

    with torch.inference_mode():
        for i, rows in enumerate(_row_blocks(adata.n_obs, batch_size)):
            batch = _batch(model, source, library_source, rows, device)
            if batch_nk is not None:
                batch[BATCH_KEY] = torch.from_numpy(batch_nk[rows]).to(device)
            x_ng = batch[X_KEY]
            out = model.module.predict_step(batch, i)
            recon_ng = written_ng = out["recon"]
            if target_code is not None:  # the counterfactual: encoded as measured, decoded as if from one batch
                as_target_nk = batch[BATCH_KEY].clone()
                as_target_nk[:, 0] = target_code
                counterfactual = model.net(x_ng, batch[BATCH_KEY], decode_batch_nk=as_target_nk)
                written_ng = model.module.reconstruct(counterfactual, batch).float()
            scores = per_cell_metrics(recon_ng[:, present_g], x_ng[:, present_g])
            for name in ("cosine", "pearson", "mse"):
                cell[name][rows] = scores[name].cpu().numpy()
            if baselines:
                for who, base_ng in model.baselines(x_ng).items():  # the plain baselines, as without covariates
                    name = "meanprofile_cosine" if who == "mean" else f"{who}_cosine"
                    cell[name][rows] = (
                        per_cell_metrics(base_ng[:, present_g], x_ng[:, present_g])["cosine"].cpu().numpy()
                    )
            moments.update(x_ng[:, present_g])
            keep = torch.as_tensor(gene_r_rows[rows], device=device)
            gene_r.update(x_ng[keep][:, present_g], recon_ng[keep][:, present_g])
            z_nk[rows] = out["z"].cpu().numpy()
            if recon != "none":
                outputs[RECON_LAYER][rows] = written_ng[:, written_g].cpu().numpy()
                if model.count_model:
                    outputs[EXPECTED_COUNTS_LAYER][rows] = out["expected_counts"][:, written_g].cpu().numpy()

    r_model = np.full(len(genes), np.nan, dtype=np.float32)
    r_model[source.present_g] = gene_r.compute()
    r_var = np.full(adata.n_vars, np.nan, dtype=np.float32)
    r_var[dest[dest >= 0]] = r_model[dest >= 0]

    adata.obsm[LATENT_OBSM.format(key=key_added)] = z_nk
    for name, values in cell.items():
        adata.obs[f"{key_added}_{name}"] = values
    adata.var[f"{key_added}_gene_r"] = r_var
    adata.uns[key_added] = _settings(model, source, key_added=key_added, batch_size=batch_size, baselines=baselines)
    gene_names = list(genes[written])
    for template, values in outputs.items():
        name = template.format(key=key_added)
        where = write_reconstruction(adata, values, gene_names, name=name, key=key_added, recon=recon)
        which = "recon" if template == RECON_LAYER else "expected_counts"
        adata.uns[key_added]["keys"][which] = None if where is None else f"{where}/{name}"
    adata.obs[f"{key_added}_split"] = splits_n
    adata.uns[key_added]["representation"] = _check_representation(model, moments, findings, source.present_g)
    adata.uns[key_added]["n_cells_per_split"] = split_counts(splits_n)
    adata.uns[key_added]["gene_r_cells"] = gene_r_covers
    if model.batch_categories:
        adata.uns[key_added]["batch_keys"] = list(model.batch_categories)
        adata.uns[key_added]["transform_batch"] = "" if transform_batch is None else str(transform_batch)
    return adata


def _check_representation(
    model: ExpraeModel, moments: GeneMoments, findings: list[str], present_g: np.ndarray
) -> dict[str, Any]:
    """Compare the embedded cells with the training cells' statistics; warn on each sign of another representation."""
    base = model.baselines
    comparison = compare_moments(
        moments, base.mean_g.double().cpu().numpy()[present_g], base.variance_g.double().cpu().numpy()[present_g]
    )
    if comparison is not None and comparison.worst > REPRESENTATION_WARN:
        findings = [*findings, f"{comparison.text()}, as if prepared differently from the training data"]
    for finding in findings:
        warnings.warn(
            f"these cells may not be in the representation the model was trained on: {finding}. Scores and latents "
            "of such data are not meaningful; use the same matrix (data.layer) and preparation as in training",
            UserWarning,
            stacklevel=3,
        )
    return {
        "shift": None if comparison is None else comparison.shift,
        "spread": None if comparison is None else comparison.spread,
        "findings": list(findings),
    }


def _library_source(
    model: ExpraeModel, adata: ad.AnnData, source: InputMatrix, *, allow_missing_genes: bool
) -> InputMatrix | None:
    """Where a count model's library sizes come from: the input, or the run's target layer when it had one."""
    if not model.needs_library:
        return None
    if model.target_layer in (None, model.layer) or model.target_layer == source.layer:
        return source
    return InputMatrix.from_adata(
        model, adata, layer=model.target_layer, allow_missing_genes=allow_missing_genes, nonnegative=True
    )


def _batch(
    model: ExpraeModel,
    source: InputMatrix,
    library_source: InputMatrix | None,
    rows: np.ndarray,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The batch the module's ``predict_step`` reads, with the keys the datamodule gives it in training."""
    x = source.preprocessed(rows).X
    batch = {X_KEY: torch.from_numpy(x.toarray() if sp.issparse(x) else np.ascontiguousarray(x)).to(device)}
    if model.count_model:
        batch[SIZE_FACTOR_KEY] = torch.from_numpy(source.size_factors(rows)).to(device)
    if library_source is not None:
        batch[LIBRARY_KEY] = torch.from_numpy(library_source.model_gene_totals(rows)).to(device)
    return batch


def _settings(
    model: ExpraeModel, source: InputMatrix, *, key_added: str, batch_size: int, baselines: bool
) -> dict[str, Any]:
    """What ``uns[key_added]`` records: the model, the matrix and genes used, and where results went."""
    preprocess = {k: v for k, v in model.preprocess.settings().items() if v is not None}
    keys: dict[str, Any] = {
        "obsm": LATENT_OBSM.format(key=key_added),
        "obs": [f"{key_added}_{name}" for name in ("cosine", "pearson", "mse", "split")],
        "var": f"{key_added}_gene_r",
    }
    return {
        "run_dir": str(model.run_dir),
        "checkpoint": str(model.checkpoint),
        "loss": model.loss,
        "latent_dim": model.latent_dim,
        "layer": source.layer,
        "n_model_genes": len(model.var_names),
        "n_missing_genes": len(source.missing),
        "missing_genes": list(source.missing),
        "preprocess": preprocess,
        "batch_size": batch_size,
        "baselines": baselines,
        "keys": keys,
    }
