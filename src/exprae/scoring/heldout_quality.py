"""Held-out evaluations beyond whole-profile scores: per-gene agreement, marker genes, and the latent space.

Whole-profile cosine is dominated by a few high-variance genes and says nothing about the latent space users
cluster and label. These evaluations answer the questions users ask of a representation, on held-out cells:

* **per-gene Pearson r** of reconstruction vs target across cells (median and 10th percentile over genes);
* **marker preservation**: for each cell type, the top ``n_markers`` genes by a Welch t statistic (type vs
  rest) on the target and on the reconstruction; the mean Jaccard overlap of the two lists;
* on the latent codes: **kNN label accuracy** (leave-one-out), **ARI / NMI** of k-means clusters (as many as
  labels) against the labels, the **silhouette** of the labels, and **kNN-graph preservation**, the mean
  fraction of each cell's ``k`` nearest neighbours in the input that are also its neighbours in the latent.

Labels must be independent of the input the model saw: on pbmc68k use ``bulk_labels`` (FACS-sorted
populations), not ``louvain``, which was computed from the same ``X``. ARI, NMI and silhouette are
scikit-learn's. Leiden clustering needs ``leidenalg``, which exprae does not depend on; k-means stands in.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from sklearn.neighbors import NearestNeighbors

from exprae.constants import BATCH_KEY, LABEL_KEY, X_KEY
from exprae.scoring.metrics import knn_label_accuracy


def per_gene_correlation(pred_ng: np.ndarray, target_ng: np.ndarray) -> np.ndarray:
    """Pearson r of each gene's prediction and target across cells; NaN where either is constant."""
    p = pred_ng - pred_ng.mean(0)
    t = target_ng - target_ng.mean(0)
    den = np.sqrt((p**2).sum(0) * (t**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (p * t).sum(0) / den, np.nan)


def top_markers(x_ng: np.ndarray, labels_n: np.ndarray, n_markers: int) -> dict[Any, set[int]]:
    """Per label (with at least 2 cells in and out), the ``n_markers`` genes of highest Welch t (label vs rest)."""
    markers = {}
    for label in np.unique(labels_n):
        inside, outside = x_ng[labels_n == label], x_ng[labels_n != label]
        if len(inside) < 2 or len(outside) < 2:
            continue
        se = np.sqrt(inside.var(0, ddof=1) / len(inside) + outside.var(0, ddof=1) / len(outside))
        t_g = np.where(se > 0, (inside.mean(0) - outside.mean(0)) / np.where(se > 0, se, 1.0), -np.inf)
        markers[label] = set(np.argsort(-t_g, kind="stable")[:n_markers].tolist())
    return markers


def marker_preservation(
    target_ng: np.ndarray, pred_ng: np.ndarray, labels_n: np.ndarray, *, n_markers: int = 10
) -> float:
    """Mean over labels of the Jaccard overlap of the top markers found on the target and on the prediction."""
    on_target, on_pred = top_markers(target_ng, labels_n, n_markers), top_markers(pred_ng, labels_n, n_markers)
    overlaps = [len(on_target[k] & on_pred[k]) / len(on_target[k] | on_pred[k]) for k in on_target if k in on_pred]
    return float(np.mean(overlaps)) if overlaps else float("nan")


def knn_indices(x_nd: np.ndarray, k: int) -> np.ndarray:
    """Each cell's ``k`` nearest other cells (Euclidean), excluding itself."""
    nn = NearestNeighbors(n_neighbors=k + 1).fit(x_nd)
    idx = nn.kneighbors(x_nd, return_distance=False)
    # Drop the cell itself (normally column 0, but exact duplicates can swap places with it).
    return np.stack([row[row != i][:k] for i, row in enumerate(idx)])


def knn_graph_preservation(x_ng: np.ndarray, z_nk: np.ndarray, *, k: int = 15) -> float:
    """Mean fraction of each cell's ``k`` input-space neighbours that are among its ``k`` latent neighbours."""
    k = min(k, len(x_ng) - 1)
    a, b = knn_indices(x_ng, k), knn_indices(z_nk, k)
    return float(np.mean([len(set(r) & set(s)) / k for r, s in zip(a, b, strict=True)]))


def cluster_agreement(z_nk: np.ndarray, labels_n: np.ndarray, *, seed: int = 0) -> dict[str, float]:
    """ARI and NMI of k-means clusters of ``z_nk`` (as many clusters as labels) against the labels."""
    n_clusters = len(np.unique(labels_n))
    clusters = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(z_nk)
    return {
        "ari": float(adjusted_rand_score(labels_n, clusters)),
        "nmi": float(normalized_mutual_info_score(labels_n, clusters)),
    }


def latent_quality(
    z_nk: np.ndarray, x_ng: np.ndarray, labels_n: np.ndarray | None, *, k: int = 15, seed: int = 0
) -> dict[str, float]:
    """kNN-graph preservation, and with labels kNN accuracy, ARI/NMI of k-means and the silhouette."""
    out = {"knn_graph_preservation": knn_graph_preservation(x_ng, z_nk, k=k)}
    if labels_n is None:
        return out
    keep = labels_n >= 0
    z, y = z_nk[keep], labels_n[keep]
    if not 2 <= len(np.unique(y)) < len(y):  # silhouette and clustering need 2 labels and fewer labels than cells
        return out
    out["knn_accuracy"] = float(knn_label_accuracy(torch.as_tensor(z), torch.as_tensor(y), k=k))
    out.update(cluster_agreement(z, y, seed=seed))
    out["silhouette"] = float(silhouette_score(z, y))
    return out


def heldout_quality(module: Any, datamodule: Any, *, stage: str = "test", k: int = 15, n_markers: int = 10) -> dict:
    """Per-gene, marker and latent evaluations of the model and of PCA at the same size on ``stage`` cells."""
    xs, targets, labels, z_model, r_model = [], [], [], [], []
    module.eval()
    with torch.no_grad():
        for batch in datamodule.split_chunks(stage):
            batch = {key: v.to(module.device) for key, v in batch.items()}
            out = module(batch[X_KEY], batch.get(BATCH_KEY))
            xs.append(batch[X_KEY].float().cpu())
            targets.append(module.eval_target(batch).float().cpu())
            z_model.append(out["z"].float().cpu())
            r_model.append(module.reconstruct(out, batch).float().cpu())
            if LABEL_KEY in batch:
                labels.append(batch[LABEL_KEY].cpu())
    x, target = torch.cat(xs), torch.cat(targets)
    mean_g = module.baselines.mean_g.detach().float().cpu()
    w_kg = module.baselines.components_kg.detach().float().cpu()
    scored = {
        "model": (torch.cat(z_model), torch.cat(r_model)),
        "pca": ((x - mean_g) @ w_kg.T, (x - mean_g) @ w_kg.T @ w_kg + mean_g),
    }
    labels_n = torch.cat(labels).numpy() if labels else None
    result = {"stage": stage, "k": k, "n_markers": n_markers, "n_cells": len(x)}
    for who, (z_nk, recon_ng) in scored.items():
        gene_r = per_gene_correlation(recon_ng.double().numpy(), target.double().numpy())
        scores = {
            "gene_r_median": float(np.nanmedian(gene_r)),
            "gene_r_p10": float(np.nanpercentile(gene_r, 10)),
            **latent_quality(z_nk.double().numpy(), x.double().numpy(), labels_n, k=k),
        }
        if labels_n is not None:
            keep = labels_n >= 0
            scores["marker_overlap"] = marker_preservation(
                target.numpy()[keep], recon_ng.numpy()[keep], labels_n[keep], n_markers=n_markers
            )
        result[who] = scores
    return result
