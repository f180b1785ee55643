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

from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from exprae.counts import CountHeadSpec, Dispersion, Library

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
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
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
            raise ValueError(f"MixedLoss alpha must lie in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.mse = MSELoss(reduction="none", dim=dim)
        self.cosine = CosineLoss(centered=centered, eps=eps, reduction="none", dim=dim)

    def per_cell(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.mse.per_cell(pred, target) + (1 - self.alpha) * self.cosine.per_cell(pred, target)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, " + super().extra_repr()


# ---------------------------------------------------------------------------------------------------------
# Embedding losses: cosine pair and triplet losses, explicit or mined from the labels of a batch.
#
# These compare rows of embeddings (e.g. latent codes z_nk) with each other rather than a reconstruction
# with its target. They share the reductions above, with one generalisation for the label-mined losses: a
# cell can take part in several pairs or triplets, so ``per_cell`` returns the *sum* of its pairs' (or
# triplets') losses ``l_n`` and how many pairs (triplets) it anchors, ``c_n``, and
#
# * ``"none"``: ``w_n l_n`` per cell;
# * ``"sum"``: ``sum_n w_n l_n``;
# * ``"mean"``: ``sum_n w_n l_n / sum_n w_n c_n``, the (weighted) mean over the pairs or triplets counted.
#
# With ``c_n = 1`` this is exactly ``reduce_per_cell``.
# ---------------------------------------------------------------------------------------------------------

Mining = Literal["all", "hard"]
_MININGS = ("all", "hard")


def cosine_similarity_matrix(
    a_nk: torch.Tensor, b_mk: torch.Tensor | None = None, *, dim: int = -1, eps: float = 1e-8
) -> torch.Tensor:
    """All pairwise cosines ``S[i, j] = cos(a_i, b_j)`` (``b`` defaults to ``a``), in float32 or float64.

    Rows are normalised by ``max(||row||, eps)`` exactly as :func:`cosine_similarity` does, so a zero row has
    cosine 0 with everything. The product runs with autocast off: under bf16 autocast a matmul would otherwise
    round the cosines to 3 significant digits.
    """
    a = _unit_rows(a_nk, dim=dim, eps=eps)
    b = a if b_mk is None else _unit_rows(b_mk, dim=dim, eps=eps)
    dtype = torch.promote_types(a.dtype, b.dtype)
    with torch.autocast(device_type=a.device.type, enabled=False):
        return a.to(dtype) @ b.to(dtype).transpose(0, 1)


def _unit_rows(x: torch.Tensor, *, dim: int, eps: float) -> torch.Tensor:
    x = _as_float(x)
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D (cells x features) tensor, got shape {tuple(x.shape)}")
    x = x.movedim(dim, -1)
    return x / x.pow(2).sum(dim=-1, keepdim=True).clamp_min(eps * eps).sqrt()


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_margin(margin: float, low: float, high: float) -> float:
    margin = float(margin)
    if not low <= margin <= high:
        raise ValueError(f"margin must lie in [{low}, {high}] for cosines, got {margin}")
    return margin


def reduce_counted(
    loss_n: torch.Tensor, count_n: torch.Tensor, weight_n: torch.Tensor | None, reduction: Reduction
) -> torch.Tensor:
    """Reduce per-cell sums ``l_n`` over ``c_n`` pairs/triplets each; ``"mean"`` averages over pairs/triplets."""
    if weight_n is not None:
        weight_n = weight_n.to(loss_n.dtype)
        if weight_n.shape != loss_n.shape:
            raise ValueError(f"weight must have one value per cell {tuple(loss_n.shape)}, got {tuple(weight_n.shape)}")
        loss_n, count_n = loss_n * weight_n, count_n * weight_n
    if reduction == "none":
        return loss_n
    if reduction == "sum":
        return loss_n.sum()
    # No pair or triplet counted (e.g. a batch of one cell type): the loss is 0 with zero gradient, not NaN.
    return loss_n.sum() / _safe_denominator(count_n.sum())


class PairCosineLoss(nn.Module):
    """``torch.nn.CosineEmbeddingLoss`` with weights: ``1 − cos`` for ``y = 1``, ``max(0, cos − margin)`` for ``y = −1``.

    ``forward(x1, x2, y, weight=None)``: ``x1``, ``x2`` are pairs of rows (features along ``dim``), ``y`` holds
    ±1 per pair. Unlike PyTorch, any other value of ``y`` is an error rather than a silent zero loss. Without
    weights every reduction equals PyTorch's; zero vectors give cos = 0 (PyTorch: the same, through its
    ``1e-12`` added to the squared norms).
    """

    def __init__(self, margin: float = 0.0, *, eps: float = 1e-8, reduction: Reduction = "mean", dim: int = -1) -> None:
        super().__init__()
        _check_reduction(reduction)
        self.margin = _check_margin(margin, -1.0, 1.0)
        self.eps, self.reduction, self.dim = eps, reduction, dim

    def per_pair(self, x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The unweighted loss of each pair."""
        if x1.shape != x2.shape:
            raise ValueError(f"x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)} differ in shape")
        cos = cosine_similarity(x1, x2, dim=self.dim, eps=self.eps)
        if y.shape != cos.shape:
            raise ValueError(f"y must have one value per pair {tuple(cos.shape)}, got {tuple(y.shape)}")
        if not bool(((y == 1) | (y == -1)).all()):
            raise ValueError("y must be 1 (similar pair) or -1 (dissimilar pair) for every pair")
        return torch.where(y > 0, 1.0 - cos, (cos - self.margin).clamp_min(0.0))

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        return reduce_per_cell(self.per_pair(x1, x2, y), weight, self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}, dim={self.dim}"


class TripletCosineLoss(nn.Module):
    """``max(0, cos(a, n) − cos(a, p) + margin)`` per explicit triplet (anchor, positive, negative).

    Equals ``torch.nn.TripletMarginWithDistanceLoss(distance_function=lambda u, v: 1 − F.cosine_similarity(u, v),
    margin=margin)``. ``weight`` is one value per triplet.
    """

    def __init__(self, margin: float = 0.2, *, eps: float = 1e-8, reduction: Reduction = "mean", dim: int = -1) -> None:
        super().__init__()
        _check_reduction(reduction)
        self.margin = _check_margin(margin, 0.0, 2.0)
        self.eps, self.reduction, self.dim = eps, reduction, dim

    def per_triplet(self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """The unweighted loss of each triplet."""
        if not anchor.shape == positive.shape == negative.shape:
            raise ValueError(
                f"anchor {tuple(anchor.shape)}, positive {tuple(positive.shape)} and negative "
                f"{tuple(negative.shape)} must have the same shape"
            )
        cos_ap = cosine_similarity(anchor, positive, dim=self.dim, eps=self.eps)
        cos_an = cosine_similarity(anchor, negative, dim=self.dim, eps=self.eps)
        return (cos_an - cos_ap + self.margin).clamp_min(0.0)

    def forward(
        self,
        anchor: torch.Tensor,
        positive: torch.Tensor,
        negative: torch.Tensor,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return reduce_per_cell(self.per_triplet(anchor, positive, negative), weight, self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}, dim={self.dim}"


def _label_masks(labels_n: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (n, n) masks of positive pairs (same label, not the cell itself) and negative pairs.

    A negative label means "unlabelled" (pandas' code for a missing category): such a cell is in no pair.
    """
    if labels_n.shape != (n,):
        raise ValueError(f"labels must have one integer per cell ({n},), got {tuple(labels_n.shape)}")
    if labels_n.is_floating_point():
        raise ValueError(f"labels must be integer codes, got dtype {labels_n.dtype}")
    labelled = labels_n >= 0
    both = labelled[:, None] & labelled[None, :]
    same = labels_n[:, None] == labels_n[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=labels_n.device)
    return same & both & ~eye, ~same & both


class _LabelledEmbeddingLoss(nn.Module):
    """Base of the losses mined from a batch's labels: ``forward(z_nk, labels_n, weight=None)``."""

    def __init__(self, *, eps: float, reduction: Reduction, dim: int) -> None:
        super().__init__()
        _check_reduction(reduction)
        self.eps, self.reduction, self.dim = eps, reduction, dim

    def per_cell(self, z_nk: torch.Tensor, labels_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each cell's summed loss over the pairs/triplets it anchors, and how many it anchors."""
        raise NotImplementedError

    def forward(self, z_nk: torch.Tensor, labels_n: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        loss_n, count_n = self.per_cell(z_nk, labels_n)
        return reduce_counted(loss_n, count_n, weight, self.reduction)


class OnlinePairCosineLoss(_LabelledEmbeddingLoss):
    """:class:`PairCosineLoss` over every ordered pair of labelled cells in a batch; same label means ``y = 1``.

    Without weights, ``"mean"`` equals ``torch.nn.CosineEmbeddingLoss`` over all ``i ≠ j`` pairs. Pulls every
    same-type pair together and pushes different types below cosine ``margin``.
    """

    def __init__(self, margin: float = 0.0, *, eps: float = 1e-8, reduction: Reduction = "mean", dim: int = -1) -> None:
        super().__init__(eps=eps, reduction=reduction, dim=dim)
        self.margin = _check_margin(margin, -1.0, 1.0)

    def per_cell(self, z_nk: torch.Tensor, labels_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s_nn = cosine_similarity_matrix(z_nk, dim=self.dim, eps=self.eps)
        pos, neg = _label_masks(labels_n, s_nn.shape[0])
        pair_nn = torch.where(pos, 1.0 - s_nn, torch.where(neg, (s_nn - self.margin).clamp_min(0.0), 0.0))
        return pair_nn.sum(dim=1), (pos | neg).sum(dim=1).to(s_nn.dtype)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}, dim={self.dim}"


class OnlineTripletCosineLoss(_LabelledEmbeddingLoss):
    """:class:`TripletCosineLoss` on triplets mined from the labels of a batch.

    ``mining="all"`` (batch-all): every valid triplet (anchor, positive of its label, negative of another
    label); ``"mean"`` averages over the *active* triplets, those with a positive loss, so the loss does not
    fade as most triplets become easy (Hermans et al. 2017). It is computed by sorting each anchor's
    negative cosines, in O(n² log n) time and O(n²) memory rather than the O(n³) of the triplet tensor.
    ``mining="hard"`` (batch-hard): one triplet per anchor, its least similar positive and most similar
    negative; ``"mean"`` averages over anchors that have both. Cells without a positive or a negative in the
    batch anchor nothing (``c_n = 0``).
    """

    def __init__(
        self,
        margin: float = 0.2,
        *,
        mining: Mining = "all",
        eps: float = 1e-8,
        reduction: Reduction = "mean",
        dim: int = -1,
    ) -> None:
        super().__init__(eps=eps, reduction=reduction, dim=dim)
        if mining not in _MININGS:
            raise ValueError(f"mining must be one of {_MININGS}, got {mining!r}")
        self.margin = _check_margin(margin, 0.0, 2.0)
        self.mining = mining

    def per_cell(self, z_nk: torch.Tensor, labels_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s_nn = cosine_similarity_matrix(z_nk, dim=self.dim, eps=self.eps)
        pos, neg = _label_masks(labels_n, s_nn.shape[0])
        if self.mining == "hard":
            return self._batch_hard(s_nn, pos, neg)
        return self._batch_all(s_nn, pos, neg)

    def _batch_hard(
        self, s_nn: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Cosines lie in [-1, 1], so ±2 are safe stand-ins for "no such cell" (the anchor is masked out anyway).
        hardest_pos_n = torch.where(pos, s_nn, 2.0).amin(dim=1)
        hardest_neg_n = torch.where(neg, s_nn, -2.0).amax(dim=1)
        valid_n = pos.any(dim=1) & neg.any(dim=1)
        loss_n = torch.where(valid_n, (hardest_neg_n - hardest_pos_n + self.margin).clamp_min(0.0), 0.0)
        return loss_n, valid_n.to(s_nn.dtype)

    def _batch_all(self, s_nn: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # For anchor i and positive p the active negatives are those with s_iq > t_ip = s_ip − margin, and
        #   sum_q relu(s_iq − t_ip) = (sum of the active s_iq) − (number active) · t_ip,
        # read off each anchor's sorted negative cosines with a binary search and a suffix sum.
        n = s_nn.shape[0]
        neg_sorted, _ = torch.where(neg, s_nn, -torch.inf).sort(dim=1)
        neg_values = torch.where(torch.isfinite(neg_sorted), neg_sorted, 0.0)
        suffix = torch.cat([neg_values.flip(1).cumsum(1).flip(1), neg_values.new_zeros(n, 1)], dim=1)
        threshold_np = s_nn - self.margin
        first_active = torch.searchsorted(neg_sorted.detach(), threshold_np.detach(), right=True)
        active_np = torch.where(pos, n - first_active, 0).to(s_nn.dtype)
        loss_np = suffix.gather(1, first_active) - active_np * threshold_np
        return torch.where(pos, loss_np, 0.0).sum(dim=1), active_np.sum(dim=1)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mining={self.mining!r}, reduction={self.reduction!r}, dim={self.dim}"


# ====================================================================== count likelihoods
# Negative log-likelihoods of raw counts (Poisson, negative binomial, zero-inflated NB), as scVI and DCA use.
# ``pred`` is not a profile but the likelihood's parameters, ``{"log_mu", "log_theta", "dropout_logit"}``
# (see exprae.counts.count_parameters); ``target`` is the raw counts. ``per_cell`` is the NLL of the whole cell
# (a sum over genes, so values are comparable across count losses as held-out NLL). Everything is computed
# from log-parameters in float32 with autocast off, so zero counts, tiny and huge means stay finite.


_STIRLING_THETA = 100.0  # above this inverse dispersion, lgamma differences are taken from Stirling's series


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def poisson_log_prob(x_ng: torch.Tensor, log_mu_ng: torch.Tensor) -> torch.Tensor:
    """log Poisson(x; mu) per entry, from ``log mu``."""
    return x_ng * log_mu_ng - log_mu_ng.exp() - torch.lgamma(x_ng + 1.0)


def nb_log_prob(x_ng: torch.Tensor, log_mu_ng: torch.Tensor, log_theta_ng: torch.Tensor) -> torch.Tensor:
    """log NB(x; mean mu, inverse dispersion theta) per entry, from ``log mu`` and ``log theta``.

    ``theta·log(theta/(theta+mu)) = -theta·softplus(log mu - log theta)`` avoids the cancellation of two
    nearly equal logs when theta >> mu. For large theta (the Poisson limit) ``lgamma(x+theta) - lgamma(theta)``
    is a difference of two huge float32 numbers; there Stirling's series gives it in terms of moderate
    quantities (accurate to ~1e-9 for theta > 100), which keeps the NLL exact to float32 precision.
    """
    theta = log_theta_ng.exp()
    large = theta > _STIRLING_THETA
    # Each branch is evaluated at a safe theta so the unused one never puts inf/NaN into the gradient.
    theta_small = torch.where(large, torch.ones_like(theta), theta)
    theta_large = torch.where(large, theta, torch.full_like(theta, 2 * _STIRLING_THETA))
    exact = (
        torch.lgamma(x_ng + theta_small)
        - torch.lgamma(theta_small)
        - theta_small * F.softplus(log_mu_ng - log_theta_ng)
        - x_ng * F.softplus(log_theta_ng - log_mu_ng)
    )
    # lgamma(x+θ) - lgamma(θ) = (θ+x-½)·log1p(x/θ) + x·log θ - x - x/(12θ(θ+x)) + O(θ⁻³); the x·log θ term
    # cancels against x·softplus(log θ - log μ) = x·(log θ - log μ) + x·softplus(log μ - log θ).
    log_mu_minus_log_theta = log_mu_ng - theta_large.log()
    stirling = (
        (theta_large + x_ng - 0.5) * torch.log1p(x_ng / theta_large)
        - x_ng
        - x_ng / (12.0 * theta_large * (theta_large + x_ng))
        + x_ng * log_mu_ng
        - (theta_large + x_ng) * F.softplus(log_mu_minus_log_theta)
    )
    return torch.where(large, stirling, exact) - torch.lgamma(x_ng + 1.0)


def zinb_log_prob(
    x_ng: torch.Tensor, log_mu_ng: torch.Tensor, log_theta_ng: torch.Tensor, dropout_logit_ng: torch.Tensor
) -> torch.Tensor:
    """log ZINB per entry: ``pi·[x=0] + (1 - pi)·NB(x)`` with ``pi = sigmoid(dropout_logit)``.

    At zero, ``log(pi + (1 - pi)·NB(0))`` is a ``logaddexp`` of two log-terms, never a log of a small sum.
    """
    log_pi = F.logsigmoid(dropout_logit_ng)
    log_one_minus_pi = F.logsigmoid(-dropout_logit_ng)
    nb = nb_log_prob(x_ng, log_mu_ng, log_theta_ng)
    log_nb_zero = -log_theta_ng.exp() * F.softplus(log_mu_ng - log_theta_ng)
    at_zero = torch.logaddexp(log_pi, log_one_minus_pi + log_nb_zero)
    return torch.where(x_ng < 0.5, at_zero, log_one_minus_pi + nb)


class CountNLL(ReconstructionLoss):
    """Base class of the count likelihoods: declares its output head, computes the NLL from parameters."""

    needs_dispersion = False
    needs_dropout = False

    def __init__(
        self,
        *,
        dispersion: Dispersion = "none",
        library: Library = "observed",
        reduction: Reduction = "mean",
        dim: int = -1,
    ) -> None:
        super().__init__(reduction=reduction, dim=dim)
        if self.needs_dispersion and dispersion == "none":
            raise ValueError(f"{type(self).__name__} needs a dispersion: 'gene' or 'gene-cell', got 'none'")
        if not self.needs_dispersion and dispersion != "none":
            raise ValueError(f"{type(self).__name__} has no dispersion; got dispersion={dispersion!r}")
        self.head = CountHeadSpec(dispersion=dispersion, dropout=self.needs_dropout, library=library)

    def log_prob(self, params: Mapping[str, torch.Tensor], target_ng: torch.Tensor) -> torch.Tensor:
        """Log-likelihood of each entry of ``target_ng`` (float32)."""
        raise NotImplementedError

    def per_cell(self, pred: Mapping[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if not isinstance(pred, Mapping):
            raise TypeError(
                f"{type(self).__name__} takes the likelihood's parameters {{'log_mu', ...}} as pred, not a "
                "profile; build the network with the loss's count head (AutoEncoder(count_head=loss.head))"
            )
        missing = [k for k in self._keys() if k not in pred]
        if missing:
            raise KeyError(f"{type(self).__name__} needs parameters {missing}; got {sorted(pred)}")
        if pred["log_mu"].shape != target.shape:
            raise ValueError(f"log_mu {tuple(pred['log_mu'].shape)} and target {tuple(target.shape)} differ in shape")
        with torch.autocast(device_type=target.device.type, enabled=False):
            params = {k: _float32(pred[k]) for k in self._keys()}
            return -self.log_prob(params, _float32(target)).sum(dim=self.dim)

    def forward(
        self, pred: Mapping[str, torch.Tensor], target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        return reduce_per_cell(self.per_cell(pred, target), weight, self.reduction)

    def _keys(self) -> tuple[str, ...]:
        return (
            ("log_mu",)
            + (("log_theta",) if self.needs_dispersion else ())
            + (("dropout_logit",) if self.needs_dropout else ())
        )

    def extra_repr(self) -> str:
        return f"head={self.head}, " + super().extra_repr()


class PoissonNLL(CountNLL):
    """Poisson NLL of raw counts per cell (sum over genes): no overdispersion, the simplest count model."""

    def __init__(self, *, library: Library = "observed", reduction: Reduction = "mean", dim: int = -1) -> None:
        super().__init__(dispersion="none", library=library, reduction=reduction, dim=dim)

    def log_prob(self, params: Mapping[str, torch.Tensor], target_ng: torch.Tensor) -> torch.Tensor:
        return poisson_log_prob(target_ng, params["log_mu"])


class NegativeBinomialNLL(CountNLL):
    """Negative-binomial NLL (mean mu, inverse dispersion theta; var = mu + mu²/theta), as scVI's default."""

    needs_dispersion = True

    def __init__(
        self,
        *,
        dispersion: Dispersion = "gene",
        library: Library = "observed",
        reduction: Reduction = "mean",
        dim: int = -1,
    ) -> None:
        super().__init__(dispersion=dispersion, library=library, reduction=reduction, dim=dim)

    def log_prob(self, params: Mapping[str, torch.Tensor], target_ng: torch.Tensor) -> torch.Tensor:
        return nb_log_prob(target_ng, params["log_mu"], params["log_theta"])


class ZINBNLL(NegativeBinomialNLL):
    """Zero-inflated NB NLL: an extra per-cell-and-gene dropout probability, as DCA and scVI's ``zinb``."""

    needs_dropout = True

    def log_prob(self, params: Mapping[str, torch.Tensor], target_ng: torch.Tensor) -> torch.Tensor:
        return zinb_log_prob(target_ng, params["log_mu"], params["log_theta"], params["dropout_logit"])
