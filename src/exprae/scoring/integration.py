"""Integration scores of a latent space: is the batch mixed, and is the biology kept? (Luecken et al. 2022)

The formulas are those of the scIB benchmark (Luecken et al., "Benchmarking atlas-level data integration in
single-cell genomics", Nat Methods 2022) as implemented by ``scib-metrics`` (not a dependency: it needs jax):

* **LISI** (Korsunsky et al. 2019): for each cell, its ``k`` nearest neighbours (Euclidean, itself excluded)
  get Gaussian weights ``exp(-β d)`` on their distances ``d``, with ``β`` found by bisection so that the
  weights' perplexity is ``perplexity`` (default ``k / 3``); the LISI is the inverse Simpson index of the
  neighbours' categories under those weights: the effective number of categories around the cell.
* **iLISI** (batch mixing) = ``(median LISI over batches − 1) / (n_batches − 1)``: 0 no mixing, 1 perfect.
* **cLISI** (biology kept) = ``(n_labels − median LISI over labels) / (n_labels − 1)``: 1 pure neighbourhoods.
* **silhouette_label** = ``(ASW over labels + 1) / 2``; **silhouette_batch** = the mean over labels of the
  mean over that label's cells of ``1 − |silhouette over batches|`` (1: batches indistinguishable within a
  cell type).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import silhouette_samples

_LOG_TOL = 1e-5  # bisection tolerance on the entropy, as in the LISI reference code
_MAX_STEPS = 50


def knn(z_nd: torch.Tensor, k: int, *, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances and indices of each cell's ``k`` nearest neighbours (itself excluded)."""
    z = z_nd.double()
    dists, idx = [], []
    for start in range(0, len(z), chunk_size):
        d_cm = torch.cdist(z[start : start + chunk_size], z)
        rows = torch.arange(d_cm.shape[0])
        d_cm[rows, rows + start] = math.inf
        d_ck, i_ck = d_cm.topk(k, dim=1, largest=False)
        dists.append(d_ck)
        idx.append(i_ck)
    return torch.cat(dists), torch.cat(idx)


def lisi(z_nd: torch.Tensor, labels_n: torch.Tensor, *, k: int = 90, perplexity: float | None = None) -> torch.Tensor:
    """Each cell's LISI: the perplexity-calibrated effective number of ``labels_n`` categories among its neighbours.

    ``k`` is capped at ``n − 1``; ``perplexity`` defaults to ``k / 3`` (scIB: 90 neighbours, perplexity 30).
    """
    n = len(labels_n)
    if n < 2:
        raise ValueError(f"LISI needs at least 2 cells, got {n}")
    k = min(k, n - 1)
    perplexity = float(perplexity if perplexity is not None else max(k // 3, 1))
    d_nk, i_nk = knn(z_nd, k)
    codes_n = torch.as_tensor(labels_n).long()
    onehot_nkl = torch.nn.functional.one_hot(codes_n[i_nk], int(codes_n.max()) + 1).double()
    p_nk = _calibrated_weights(d_nk, math.log(perplexity))
    simpson_n = (p_nk[..., None] * onehot_nkl).sum(1).pow(2).sum(1)
    return (1.0 / simpson_n).float()


def _calibrated_weights(d_nk: torch.Tensor, log_u: float) -> torch.Tensor:
    """Weights ``exp(-β_n d)`` (normalised per cell) whose entropy is ``log_u``, by per-cell bisection on β."""
    n = d_nk.shape[0]
    beta = torch.ones(n, dtype=torch.float64)
    lo = torch.full((n,), -math.inf, dtype=torch.float64)
    hi = torch.full((n,), math.inf, dtype=torch.float64)
    # Distances relative to each cell's nearest neighbour: the same weights once normalised, no underflow.
    d = d_nk - d_nk[:, :1]
    for _ in range(_MAX_STEPS):
        p = torch.exp(-d * beta[:, None])
        s = p.sum(1)
        entropy = torch.log(s) + beta * (d * p).sum(1) / s
        diff = entropy - log_u
        active = diff.abs() >= _LOG_TOL  # cells still searching; the others keep their β
        if not bool(active.any()):
            break
        sharpen = active & (diff > 0)  # entropy too high: larger β
        soften = active & (diff <= 0)
        lo = torch.where(sharpen, beta, lo)
        hi = torch.where(soften, beta, hi)
        up = torch.where(torch.isinf(hi), beta * 2, (beta + hi) / 2)
        down = torch.where(torch.isinf(lo), beta / 2, (beta + lo) / 2)
        beta = torch.where(sharpen, up, torch.where(soften, down, beta))
    p = torch.exp(-d * beta[:, None])
    return p / p.sum(1, keepdim=True)


def ilisi(z_nd: torch.Tensor, batch_n: torch.Tensor, *, k: int = 90) -> float:
    """scIB's iLISI: ``(median LISI over batches − 1) / (n_batches − 1)``, in [0, 1], 1 = perfectly mixed."""
    n_batches = len(torch.unique(batch_n))
    if n_batches < 2:
        return math.nan
    return (float(lisi(z_nd, batch_n, k=k).median()) - 1) / (n_batches - 1)


def clisi(z_nd: torch.Tensor, labels_n: torch.Tensor, *, k: int = 90) -> float:
    """scIB's cLISI: ``(n_labels − median LISI over labels) / (n_labels − 1)``, 1 = pure neighbourhoods."""
    n_labels = len(torch.unique(labels_n))
    if n_labels < 2:
        return math.nan
    return (n_labels - float(lisi(z_nd, labels_n, k=k).median())) / (n_labels - 1)


def silhouette_label(z_nd: torch.Tensor, labels_n: torch.Tensor) -> float:
    """scIB's label ASW rescaled to [0, 1]: ``(mean silhouette over labels + 1) / 2``."""
    labels = np.asarray(labels_n)
    if len(np.unique(labels)) < 2:
        return math.nan
    return float((silhouette_samples(z_nd.double().numpy(), labels).mean() + 1) / 2)


def silhouette_batch(z_nd: torch.Tensor, batch_n: torch.Tensor, labels_n: torch.Tensor) -> float:
    """scIB's batch ASW: per label, the mean of ``1 − |silhouette over batches|``; then the mean over labels.

    Labels whose cells all come from one batch (or that have a single cell) are skipped, as in scIB.
    """
    z, batches, labels = z_nd.double().numpy(), np.asarray(batch_n), np.asarray(labels_n)
    per_label = []
    for label in np.unique(labels):
        rows = labels == label
        n_batches = len(np.unique(batches[rows]))
        if n_batches < 2 or n_batches == rows.sum():
            continue
        per_label.append(float(np.mean(1 - np.abs(silhouette_samples(z[rows], batches[rows])))))
    return float(np.mean(per_label)) if per_label else math.nan


def integration_scores(
    z_nd: torch.Tensor, batch_n: torch.Tensor, labels_n: torch.Tensor | None = None, *, k: int = 90
) -> dict[str, float]:
    """iLISI, and with labels cLISI, silhouette_label and silhouette_batch, of one latent space."""
    z = z_nd.detach().float().cpu()
    batch_n = batch_n.detach().cpu()
    scores = {"ilisi": ilisi(z, batch_n, k=k)}
    if labels_n is not None:
        labels_n = labels_n.detach().cpu()
        keep = labels_n >= 0  # unlabelled cells (negative codes) are left out of the label scores
        z_l, b_l, y_l = z[keep], batch_n[keep], labels_n[keep]
        if len(y_l) > 2:
            scores["clisi"] = clisi(z_l, y_l, k=k)
            scores["silhouette_label"] = silhouette_label(z_l, y_l)
            scores["silhouette_batch"] = silhouette_batch(z_l, b_l, y_l)
    return scores
