"""Reconstruction losses on expression profiles: MSE, 1 − cosine and their weighted mix.

Every loss has one interface, ``loss(pred_ng, target_ng, weight=None)``: ``pred_ng`` and ``target_ng`` are
cells x genes (the gene axis is ``dim``), ``weight`` is an optional per-cell weight ``w_n``. ``reduction``:

* ``"none"``: one value per cell, ``l_n`` (times ``w_n`` if weights are given);
* ``"sum"``: ``sum_n w_n l_n``;
* ``"mean"``: ``sum_n w_n l_n / sum_n w_n`` (plain mean without weights) — a weighted average, so scaling
  all weights by a constant does not change the loss.

All arithmetic is in float32 (or float64 if given), also under bf16 autocast, so the loss is stable.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from exprae.errors import ConfigError

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS = ("mean", "sum", "none")


def cosine_similarity(
    a_ng: torch.Tensor, b_ng: torch.Tensor, *, dim: int = -1, eps: float = 1e-8, centered: bool = False
) -> torch.Tensor:
    """Per-row cosine similarity along ``dim``; a zero row gives 0 (not NaN) with finite gradients.

    With ``centered=True`` each row's mean is subtracted first, which makes it the Pearson correlation.
    """
    a, b = _as_float(a_ng), _as_float(b_ng)
    if centered:
        a, b = _center(a, dim=dim), _center(b, dim=dim)
    dot = (a * b).sum(dim=dim)
    # Clamping each squared norm (rather than the product of norms) keeps the gradient finite at a zero row:
    # sqrt is never evaluated at 0.
    norm_a = a.pow(2).sum(dim=dim).clamp_min(eps * eps).sqrt()
    norm_b = b.pow(2).sum(dim=dim).clamp_min(eps * eps).sqrt()
    return dot / (norm_a * norm_b)


def _center(x: torch.Tensor, *, dim: int) -> torch.Tensor:
    """Subtract each row's mean; a row that is constant up to rounding becomes exactly zero (so r = 0)."""
    centered = x - x.mean(dim=dim, keepdim=True)
    # In a constant row the rounding error of the mean leaves residuals of ~eps_machine x the row's size; their
    # direction is noise, and would give cosines of ±0.1 and more against other rows instead of 0.
    with torch.no_grad():
        tol = 32 * torch.finfo(x.dtype).eps * x.pow(2).sum(dim=dim, keepdim=True).sqrt()
        constant = centered.pow(2).sum(dim=dim, keepdim=True).sqrt() <= tol
    return torch.where(constant, torch.zeros_like(centered), centered)


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def reduce_per_cell(loss_n: torch.Tensor, weight_n: torch.Tensor | None, reduction: Reduction) -> torch.Tensor:
    """Apply per-cell weights and the reduction documented in this module."""
    if weight_n is not None:
        weight_n = weight_n.to(loss_n.dtype)
        if weight_n.shape != loss_n.shape:
            raise ValueError(f"weight must have one value per cell {tuple(loss_n.shape)}, got {tuple(weight_n.shape)}")
        loss_n = loss_n * weight_n
    if reduction == "none":
        return loss_n
    if reduction == "sum":
        return loss_n.sum()
    if weight_n is None:
        return loss_n.mean()
    return loss_n.sum() / _safe_denominator(weight_n.sum())


def _safe_denominator(total: torch.Tensor) -> torch.Tensor:
    # A zero total (all weights 0, or no pair counted) has a zero numerator too; dividing by 1 then gives 0 with
    # zero gradients. Clamping to a tiny value instead makes the backward 1/tiny, which overflows to inf (and
    # inf · 0 = NaN) as soon as the loss is scaled by more than ~4, e.g. by an auxiliary-loss weight.
    return torch.where(total != 0, total, torch.ones_like(total))


class ReconstructionLoss(nn.Module):
    """Base class: subclasses define ``per_cell(pred, target)``; this class handles weights and reduction."""

    def __init__(self, *, reduction: Reduction = "mean", dim: int = -1) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ConfigError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.dim = dim

    def per_cell(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        return reduce_per_cell(self.per_cell(pred, target), weight, self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, dim={self.dim}"


class MSELoss(ReconstructionLoss):
    """Mean squared error per cell (mean over genes), then reduced over cells."""

    def per_cell(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (_as_float(pred) - _as_float(target)).pow(2).mean(dim=self.dim)


class CosineLoss(ReconstructionLoss):
    """1 − cos(pred, target) per cell; ``centered=True`` gives the Pearson loss 1 − r."""

    def __init__(
        self, *, centered: bool = False, eps: float = 1e-8, reduction: Reduction = "mean", dim: int = -1
    ) -> None:
        super().__init__(reduction=reduction, dim=dim)
        self.centered = centered
        self.eps = eps

    def per_cell(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 1.0 - cosine_similarity(pred, target, dim=self.dim, eps=self.eps, centered=self.centered)


class MixedLoss(ReconstructionLoss):
    """``alpha · MSE + (1 − alpha) · (1 − cos)`` per cell; alpha=1 is MSE, alpha=0 is the cosine loss."""

    def __init__(
        self,
        alpha: float = 0.5,
        *,
        centered: bool = False,
        eps: float = 1e-8,
        reduction: Reduction = "mean",
        dim: int = -1,
    ) -> None:
        super().__init__(reduction=reduction, dim=dim)
        if not 0.0 <= float(alpha) <= 1.0:
            raise ConfigError(f"loss.alpha must lie in [0, 1] (1 is MSE, 0 the cosine loss), got {alpha}")
        self.alpha = float(alpha)
        self.mse = MSELoss(reduction="none", dim=dim)
        self.cosine = CosineLoss(centered=centered, eps=eps, reduction="none", dim=dim)

    def per_cell(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.mse.per_cell(pred, target) + (1 - self.alpha) * self.cosine.per_cell(pred, target)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, " + super().extra_repr()
