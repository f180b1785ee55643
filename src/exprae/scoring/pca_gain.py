"""A model's gain over PCA in units a reader can weigh: equivalent PCA components, and how far training moved.

A model that starts at PCA-k and beats it by 0.003 cosine has gained what, exactly? The answer here is the
number of components ``k'`` at which PCA, fitted on the same training cells and scored on the same held-out
cells per cell, matches the model's score: "exprae-32 ≈ PCA-34" says the nonlinear network is worth two more
linear components. The PCA-k curve is computed in closed form for every ``k`` from one projection, so the
whole curve costs about one PCA reconstruction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from exprae.constants import X_KEY
from exprae.nn.baselines import fit_pca


def pca_score_curve(
    train_chunks: Iterable[torch.Tensor],
    eval_pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    max_components: int,
) -> dict[str, np.ndarray]:
    """Mean per-cell cosine, Pearson r and MSE of PCA-k for k = 0 … ``max_components`` on held-out cells.

    ``eval_pairs`` yields ``(x_ng, target_ng)``: PCA reconstructs ``x`` and is scored against ``target``, as
    the PCA baseline is. Index ``k`` of each array is PCA with ``k`` components (0: the mean profile).
    """
    fit = fit_pca(train_chunks, max_components)
    mu_g, w_kg = fit.mean_g.double(), fit.components_kg.double()
    sums = {name: torch.zeros(max_components + 1, dtype=torch.float64) for name in ("cosine", "pearson", "mse")}
    n_cells = 0
    for x_ng, t_ng in eval_pairs:
        x, t = x_ng.double(), t_ng.double()
        n_genes = x.shape[1]
        c_nk = (x - mu_g) @ w_kg.T
        # recon_k = mu + sum_{j<=k} c_j w_j with orthonormal w: every score is a cumulative sum over j.
        dot_nk = _cumulative(c_nk * (t @ w_kg.T), t @ mu_g)
        sq_nk = _cumulative(2 * c_nk * (w_kg @ mu_g) + c_nk.pow(2), mu_g.pow(2).sum().expand(len(x)))
        mean_nk = _cumulative(c_nk * w_kg.mean(1), mu_g.mean().expand(len(x)))
        t_sq, t_mean = t.pow(2).sum(1, keepdim=True), t.mean(1, keepdim=True)
        eps = 1e-8
        cosine = dot_nk / (sq_nk.clamp_min(0).sqrt().clamp_min(eps) * t_sq.sqrt().clamp_min(eps))
        dot_c = dot_nk - n_genes * mean_nk * t_mean
        sq_c = (sq_nk - n_genes * mean_nk.pow(2)).clamp_min(0)
        t_sq_c = (t_sq - n_genes * t_mean.pow(2)).clamp_min(0)
        pearson = dot_c / (sq_c.sqrt().clamp_min(eps) * t_sq_c.sqrt().clamp_min(eps))
        mse = (sq_nk - 2 * dot_nk + t_sq) / n_genes
        for name, value in (("cosine", cosine), ("pearson", pearson), ("mse", mse)):
            sums[name] += value.sum(0)
        n_cells += len(x)
    if n_cells == 0:
        raise ValueError("the PCA score curve needs at least one held-out cell")
    return {name: (total / n_cells).numpy() for name, total in sums.items()}


def _cumulative(terms_nk: torch.Tensor, start_n: torch.Tensor) -> torch.Tensor:
    """Column k: ``start`` plus the first k terms (the score's part from the reconstruction with k components)."""
    zeros_n1 = torch.zeros(len(terms_nk), 1, dtype=terms_nk.dtype)
    return start_n[:, None] + torch.cat([zeros_n1, terms_nk.cumsum(1)], dim=1)


def equivalent_components(curve_k: np.ndarray, score: float, *, higher_is_better: bool = True) -> float | None:
    """The (interpolated) number of PCA components whose score first reaches ``score``; None beyond the curve.

    ``curve_k[k]`` is PCA-k's score. Between two integers the curve is interpolated linearly, so a model
    halfway between PCA-33 and PCA-34 is worth 33.5 components.
    """
    curve = np.asarray(curve_k, dtype=np.float64) * (1 if higher_is_better else -1)
    target = score * (1 if higher_is_better else -1)
    reached = np.flatnonzero(curve >= target)
    if len(reached) == 0:
        return None
    k = int(reached[0])
    if k == 0:
        return 0.0
    lo, hi = curve[k - 1], curve[k]
    return float(k - 1 + (target - lo) / (hi - lo)) if hi > lo else float(k)


def relative_weight_change(start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor]) -> float:
    """``‖θ − θ₀‖ / ‖θ₀‖`` over the floating-point tensors both states hold: how far training moved."""
    num = den = 0.0
    for name, theta0 in start.items():
        if name in end and theta0.is_floating_point():
            theta0 = theta0.detach().double().cpu()
            num += float((end[name].detach().double().cpu() - theta0).pow(2).sum())
            den += float(theta0.pow(2).sum())
    return float(np.sqrt(num / den)) if den > 0 else float("nan")


def gain_over_pca(
    module: Any, datamodule: Any, model_scores: Mapping[str, float], *, stage: str = "val"
) -> dict[str, Any]:
    """The model's equivalent PCA components on ``stage`` cells, and how far training moved from its start.

    ``components`` is ``k'`` for the model's mean cosine (``None`` when the model beats every PCA up to
    ``max_components`` = min(4 × latent size, genes, training cells − 1)); ``extra_components`` is
    ``k' − latent_dim``. ``relative_weight_change`` is ``‖θ − θ₀‖/‖θ₀‖`` of the network from its start (PCA or
    random) to the scored weights; ``cosine_change_from_pca`` is the model's cosine minus PCA-latent's.
    """
    latent = int(module.net.latent_dim)
    max_k = min(4 * latent, datamodule.n_genes, len(datamodule.splits["train"]) - 1)
    # Chunks of 1,024 cells keep this float64 pass as small as a training buffer (backed data stays bounded).
    pairs = ((batch[X_KEY], module.eval_target(batch)) for batch in datamodule.split_chunks(stage, chunk_size=1024))
    curve = pca_score_curve(datamodule.train_chunks(), pairs, max_components=max_k)
    k_equiv = equivalent_components(curve["cosine"], float(model_scores["cosine"]))
    moved = None
    if module.start_state is not None:
        moved = relative_weight_change(module.start_state, module.net.state_dict())
    return {
        "stage": stage,
        "metric": "cosine",
        "latent_dim": latent,
        "components": k_equiv,
        "extra_components": None if k_equiv is None else k_equiv - latent,
        "max_components": max_k,
        "pca_cosine_by_components": [float(v) for v in curve["cosine"]],
        "cosine_change_from_pca": float(model_scores["cosine"] - curve["cosine"][latent]),
        "relative_weight_change": moved,
    }
