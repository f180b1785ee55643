"""Per-cell reconstruction metrics, aggregated exactly over all held-out cells (also across DDP ranks).

Every metric is computed per cell and then averaged over cells, never over a flattened matrix: a mean
cosine of 0.4 means "the average held-out cell's reconstruction points 0.4 of the way along its profile".
Sums and counts are reduced with ``sum`` across processes, so the result is the global mean over every
validation cell, not a mean of per-rank means.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from exprae.losses import cosine_similarity, cosine_similarity_matrix


def per_cell_metrics(
    pred_ng: torch.Tensor, target_ng: torch.Tensor, *, mask_ng: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Cosine, Pearson r and MSE of each cell's reconstruction (float32, one value per cell).

    With a boolean ``mask_ng`` each cell is scored on its masked entries only: the cosine and MSE over those
    entries, and the Pearson r after centring on their mean. Rows without masked entries are scored 0.
    """
    pred, target = pred_ng.float(), target_ng.float()
    if mask_ng is None:
        return {
            "cosine": cosine_similarity(pred, target),
            "pearson": cosine_similarity(pred, target, centered=True),
            "mse": (pred - target).pow(2).mean(dim=-1),
        }
    m = mask_ng.to(pred.dtype)
    n_n = m.sum(dim=-1).clamp_min(1.0)
    pred_c = (pred - (pred * m).sum(-1, keepdim=True) / n_n[:, None]) * m
    target_c = (target - (target * m).sum(-1, keepdim=True) / n_n[:, None]) * m
    return {
        "cosine": cosine_similarity(pred * m, target * m),
        "pearson": cosine_similarity(pred_c, target_c),
        "mse": ((pred - target).pow(2) * m).sum(dim=-1) / n_n,
    }


class ReconstructionMetrics(Metric):
    """Running per-cell means of cosine, Pearson, MSE (and the loss), plus cosine quantiles.

    ``compute()`` returns ``{"cosine", "pearson", "mse", "loss", "cosine_median", "cosine_p10"}`` (``loss``
    only when losses were given); the quantiles need every cell's cosine, gathered across processes, because a mean of 0.4 can hide a
    bimodal population.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("cosine", "pearson", "mse", "loss"):
            self.add_state(f"sum_{name}", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_cells", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_loss", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("cosines", default=[], dist_reduce_fx="cat")

    def update(
        self,
        pred_ng: torch.Tensor,
        target_ng: torch.Tensor,
        loss_n: torch.Tensor | None = None,
        *,
        mask_ng: torch.Tensor | None = None,
    ) -> None:
        """Add a batch; with ``mask_ng`` only masked entries are scored and cells with none are skipped."""
        values = per_cell_metrics(pred_ng, target_ng, mask_ng=mask_ng)
        if mask_ng is not None:
            keep_n = mask_ng.any(dim=-1)
            values = {name: v[keep_n] for name, v in values.items()}
            loss_n = None if loss_n is None else loss_n[keep_n]
        for name, v in values.items():
            setattr(self, f"sum_{name}", getattr(self, f"sum_{name}") + v.double().sum())
        # Out-of-place sums: states reset inside trainer.validate's inference mode are inference tensors, which
        # cannot be updated in place by a later validation under plain no_grad (the PCA-start check does this).
        self.n_cells = self.n_cells + values["cosine"].numel()
        if loss_n is not None:
            self.sum_loss = self.sum_loss + loss_n.detach().double().sum()
            self.n_loss = self.n_loss + loss_n.numel()
        self.cosines.append(values["cosine"].detach())

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.n_cells.clamp_min(1)
        out = {name: (getattr(self, f"sum_{name}") / n).float() for name in ("cosine", "pearson", "mse")}
        if self.n_loss > 0:
            out["loss"] = (self.sum_loss / self.n_loss).float()
        cos = self.cosines if isinstance(self.cosines, torch.Tensor) else torch.cat(self.cosines or [torch.zeros(0)])
        if cos.numel():
            out["cosine_median"] = cos.float().median()
            out["cosine_p10"] = torch.quantile(cos.float(), 0.1)
        return out


def knn_label_accuracy(
    z_nk: torch.Tensor, labels_n: torch.Tensor, *, k: int = 15, chunk_size: int = 1024
) -> torch.Tensor:
    """Leave-one-out fraction of labelled cells whose label is the majority among their ``k`` cosine-nearest others.

    A cell is never its own neighbour. Ties between labels go to the label with the larger summed cosine.
    Cells with a negative label (unlabelled) are neither scored nor neighbours. Returns NaN when no cell can
    be scored.
    """
    if k < 1:
        raise ValueError(f"k must be a positive number of neighbours, got {k}")
    labelled = labels_n >= 0
    z_q, y_q = z_nk[labelled], labels_n[labelled].long()
    k = min(k, len(y_q) - 1)
    if len(y_q) == 0 or k < 1:
        return torch.tensor(float("nan"))
    n_labels = int(y_q.max()) + 1
    correct = 0
    for start in range(0, len(y_q), chunk_size):
        s_cr = cosine_similarity_matrix(z_q[start : start + chunk_size], z_q)
        rows = torch.arange(s_cr.shape[0], device=s_cr.device)
        s_cr[rows, rows + start] = -torch.inf
        sim_ck, idx_ck = s_cr.topk(k, dim=1)
        onehot_ckl = torch.nn.functional.one_hot(y_q[idx_ck], n_labels).to(sim_ck.dtype)
        votes_cl = onehot_ckl.sum(dim=1)
        # Summed cosines lie in [-k, k]; scaled into (-1/2, 1/2) they break ties without outvoting a count.
        votes_cl = votes_cl + (onehot_ckl * sim_ck[..., None]).sum(dim=1) / (2 * k + 1)
        correct += int((votes_cl.argmax(dim=1) == y_q[start : start + chunk_size]).sum())
    return torch.tensor(correct / len(y_q))


class PerBatchMetrics(Metric):
    """Per-cell cosine, Pearson r and MSE averaged within each batch level (cells weighted equally).

    ``compute()`` returns ``{"cosine", "pearson", "mse", "n_cells"}``, each a vector over the ``n_batches``
    levels (NaN for a level without cells). Weighting each level's mean by its cells gives back the global
    mean of :class:`ReconstructionMetrics`; sums are reduced with ``sum`` across processes, so it is exact
    under DDP too.
    """

    full_state_update = False
    higher_is_better = None
    NAMES = ("cosine", "pearson", "mse")

    def __init__(self, n_batches: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n_batches = int(n_batches)
        for name in (*self.NAMES, "n_cells"):
            zeros = torch.zeros(self.n_batches, dtype=torch.float64)
            self.add_state(f"sum_{name}", default=zeros, dist_reduce_fx="sum")

    def update(self, pred_ng: torch.Tensor, target_ng: torch.Tensor, batch_n: torch.Tensor) -> None:
        """Add a batch of cells with their batch codes ``batch_n``."""
        values = per_cell_metrics(pred_ng, target_ng)
        index = batch_n.long().to(self.sum_n_cells.device)
        for name, v in (*values.items(), ("n_cells", torch.ones_like(values["cosine"]))):
            total = torch.zeros_like(self.sum_n_cells).index_add_(0, index, v.detach().double())
            setattr(self, f"sum_{name}", getattr(self, f"sum_{name}") + total)  # out of place, as above

    def compute(self) -> dict[str, torch.Tensor]:
        n_b = self.sum_n_cells
        out = {name: (getattr(self, f"sum_{name}") / n_b).float() for name in self.NAMES}  # 0/0: NaN, no cells
        out["n_cells"] = n_b.float()
        return out


def dispersion_agreement(log_theta_g: torch.Tensor, true_log_theta_g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pearson r of two per-gene log dispersions, and Spearman r (Pearson of their ranks); NaN truths skipped."""
    a, b = log_theta_g.double().cpu(), true_log_theta_g.double().cpu()
    keep = torch.isfinite(b)
    a, b = a[keep], b[keep]

    def pearson(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return cosine_similarity(u, v, centered=True).float()

    def ranks(u: torch.Tensor) -> torch.Tensor:
        return u.argsort().argsort().double()  # continuous values: ties have probability zero

    return {"dispersion_pearson": pearson(a, b), "dispersion_spearman": pearson(ranks(a), ranks(b))}
