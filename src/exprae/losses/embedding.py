"""Embedding losses: cosine pair and triplet losses on rows of a latent, explicit or mined from labels."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from exprae.losses.expression import (
    _REDUCTIONS,
    Reduction,
    _as_float,
    _safe_denominator,
    cosine_similarity,
    reduce_per_cell,
)

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
