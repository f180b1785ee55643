"""Honest baselines fitted on training cells: the mean profile and PCA at the autoencoder's latent size.

Both are scored on the same held-out cells as the model, so a user sees whether a mean cosine of 0.4 is
good (better than PCA) or bad (worse than predicting every cell as the average cell).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn


class PCAFit(NamedTuple):
    """A PCA of the training cells: the mean, the components and each gene's variance."""

    mean_g: torch.Tensor
    components_kg: torch.Tensor
    variance_g: torch.Tensor  # of each gene


def fit_pca(chunks: Iterable[torch.Tensor], n_components: int) -> PCAFit:
    """Fit PCA in one streaming pass over dense cell chunks.

    Accumulates the gene covariance in float64 and eigendecomposes it, so the memory is genes x genes
    whatever the number of cells, and sparse data only needs to be densified one chunk at a time.
    """
    n, sum_g, gram_gg = 0, None, None
    for x_ng in chunks:
        x = x_ng.double()
        if sum_g is None:
            sum_g = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            gram_gg = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        n += x.shape[0]
        sum_g += x.sum(0)
        gram_gg += x.T @ x
    if n < 2:
        raise ValueError(f"PCA needs at least 2 training cells, got {n}")
    n_genes = sum_g.shape[0]
    if not 1 <= n_components <= min(n_genes, n - 1):
        raise ValueError(
            f"PCA with {n_components} components needs 1 <= n_components <= min(genes={n_genes}, cells-1={n - 1})"
        )
    mean_g = sum_g / n
    cov_gg = (gram_gg - n * torch.outer(mean_g, mean_g)) / (n - 1)
    _, eigvecs = torch.linalg.eigh(cov_gg)  # ascending
    components_kg = eigvecs[:, -n_components:].flip(-1).T.contiguous()
    # Fix the sign (largest-magnitude loading positive) so the fit is reproducible across platforms.
    sign_k = torch.sign(components_kg.gather(1, components_kg.abs().argmax(1, keepdim=True)))
    components_kg = components_kg * sign_k
    return PCAFit(mean_g.float(), components_kg.float(), cov_gg.diagonal().clamp_min(0.0).float())


class Baselines(nn.Module):
    """Mean-profile and PCA reconstructions, kept as buffers so they travel with the checkpoint."""

    def __init__(self, n_genes: int, n_components: int) -> None:
        super().__init__()
        self.register_buffer("mean_g", torch.zeros(n_genes))
        self.register_buffer("components_kg", torch.zeros(n_components, n_genes))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        # Each gene's variance in the training cells: the units of the network's residual branches.
        self.register_buffer("variance_g", torch.ones(n_genes))

    def fit(self, chunks: Iterable[torch.Tensor]) -> Baselines:
        """Fit both baselines on training-cell chunks."""
        fit = fit_pca(chunks, self.components_kg.shape[0])
        self.mean_g.copy_(fit.mean_g)
        self.components_kg.copy_(fit.components_kg)
        self.variance_g.copy_(fit.variance_g)
        self.fitted.fill_(True)
        return self

    def mean_profile(self, x_ng: torch.Tensor) -> torch.Tensor:
        """Every cell reconstructed as the training mean profile."""
        return self.mean_g.to(x_ng.dtype).expand_as(x_ng)

    def pca(self, x_ng: torch.Tensor) -> torch.Tensor:
        """Projection onto the top principal components of the training cells and back."""
        w_kg = self.components_kg.to(x_ng.dtype)
        mean_g = self.mean_g.to(x_ng.dtype)
        return (x_ng - mean_g) @ w_kg.T @ w_kg + mean_g

    def forward(self, x_ng: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mean": self.mean_profile(x_ng), "pca": self.pca(x_ng)}
