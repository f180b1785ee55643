"""An epoch's held-out latent codes, kept batch by batch and scored at its end: kNN labels, scIB integration.

The model's latents (and, with a batch covariate, PCA's and the per-batch PCA's scores of the same cells) are
kept on the host per stage; at the epoch's end ``knn_accuracy`` gives the leave-one-out kNN label accuracy
(:func:`~exprae.scoring.metrics.knn_label_accuracy`) and ``integration`` the scIB scores
(:func:`~exprae.scoring.integration.integration_scores`) on at most ``max_cells`` cells, evenly spaced in the
stage's order so the same cells are scored every epoch. Each call empties what it scored.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from exprae.scoring.integration import integration_scores
from exprae.scoring.metrics import knn_label_accuracy

INTEGRATED = ("model", "pca", "batch_pca")  # whose latents get the integration scores, in logging order


class HeldOutLatents:
    """Latents of one epoch's held-out cells per stage, for the scores only a set of cells has."""

    def __init__(self, stages: tuple[str, ...], *, knn_k: int, integration_k: int, max_cells: int) -> None:
        self.knn_k, self.integration_k, self.max_cells = knn_k, integration_k, max_cells
        self._labelled: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {stage: [] for stage in stages}
        self._mixing: dict[str, list[dict[str, torch.Tensor]]] = {stage: [] for stage in stages}

    def keep_labelled(self, stage: str, z_nk: torch.Tensor, labels_n: torch.Tensor) -> None:
        """Keep the model's latents of labelled cells for the kNN label accuracy."""
        self._labelled[stage].append((z_nk.detach().float(), labels_n))

    def keep_mixing(
        self,
        stage: str,
        z_nk: torch.Tensor,
        batch_n: torch.Tensor,
        *,
        baseline_z: dict[str, torch.Tensor],
        labels_n: torch.Tensor | None,
    ) -> None:
        """Keep the model's and the baselines' latents with batch codes (and labels) for the integration scores."""
        kept = {"model": z_nk.detach().float().cpu(), "batch": batch_n.cpu()}
        kept.update({who: z.cpu() for who, z in baseline_z.items()})
        if labels_n is not None:
            kept["label"] = labels_n.cpu()
        self._mixing[stage].append(kept)

    def knn_accuracy(self, stage: str) -> torch.Tensor | None:
        """Leave-one-out kNN label accuracy of the kept latents (cosine, ``knn_k`` neighbours); None if none kept."""
        if not self._labelled[stage]:
            return None
        z_nk, labels_n = (torch.cat(parts) for parts in zip(*self._labelled[stage], strict=True))
        self._labelled[stage].clear()
        return knn_label_accuracy(z_nk, labels_n, k=self.knn_k)

    def integration(self, stage: str) -> Iterator[tuple[str, dict[str, float]]]:
        """``(who, scores)`` for the model, PCA and per-batch PCA latents kept (at least 3 cells needed)."""
        parts = self._mixing[stage]
        if not parts:
            return
        kept = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        self._mixing[stage].clear()
        n = len(kept["batch"])
        rows = torch.linspace(0, n - 1, min(n, self.max_cells)).round().long()
        labels = kept["label"][rows] if "label" in kept else None
        for who in INTEGRATED:
            if who not in kept or len(rows) < 3:
                continue
            yield who, integration_scores(kept[who][rows], kept["batch"][rows], labels, k=self.integration_k)
