"""The LightningModule: trains the network with the configured loss, scores it and the baselines per cell."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from exprae.baselines import Baselines
from exprae.constants import LABEL_KEY, TARGET_KEY, X_KEY
from exprae.losses import ReconstructionLoss, reduce_per_cell
from exprae.metrics import ReconstructionMetrics, knn_label_accuracy
from exprae.nn import AutoEncoder

EVAL_STAGES = ("val", "test")
SCORED = ("model", "mean", "pca")  # the model and the two baselines, scored on the same cells


class AutoencoderModule(pl.LightningModule):
    """Owns the loss, the optimizer and the metrics; the network itself is a plain ``nn.Module``.

    Logged keys: ``train/loss`` every ``log_every_n_steps``; each validation epoch ``val/{loss, mse, cosine,
    pearson, cosine_median, cosine_p10}`` for the model and ``baseline/{mean,pca}/val/...`` for the
    baselines; the same under ``test/`` after testing.

    With an auxiliary latent loss (``aux_loss(z_nk, labels_n)``, e.g. :class:`~exprae.losses.OnlineTripletCosineLoss`)
    the training loss is ``recon + aux_weight · aux``, and ``train/recon`` and ``train/aux`` are logged too.
    When batches carry labels, ``{val,test}/knn_accuracy`` is the leave-one-out kNN label accuracy of the
    latent codes (cosine, ``knn_k`` neighbours) within the stage's cells. The validation and test loaders
    give every DDP rank all of their cells, so each rank computes the same, global value.
    """

    def __init__(
        self,
        net: AutoEncoder,
        loss: ReconstructionLoss,
        *,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_monitor: str = "val/loss",
        baselines: bool = True,
        aux_loss: nn.Module | None = None,
        aux_weight: float = 1.0,
        knn_k: int = 15,
    ) -> None:
        super().__init__()
        self.net = net
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_monitor = scheduler_monitor
        self.with_baselines = baselines
        self.aux_loss, self.aux_weight, self.knn_k = aux_loss, float(aux_weight), knn_k
        self._latents: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {stage: [] for stage in EVAL_STAGES}
        # Baselines are needed for the PCA start even when they are not reported.
        self.baselines = Baselines(net.n_genes, net.latent_dim)
        self.metrics = nn.ModuleDict(
            {f"{stage}_{who}": ReconstructionMetrics() for stage in EVAL_STAGES for who in SCORED}
        )

    # ------------------------------------------------------------------ set-up

    def setup(self, stage: str) -> None:
        """Fit the baselines on the training cells (and start the network at PCA) before the first fit."""
        if stage != "fit" or bool(self.baselines.fitted):
            return
        datamodule = self.trainer.datamodule
        self.baselines.fit(datamodule.train_chunks())
        if self.net.init == "pca":
            self.net.init_from_pca(self.baselines.mean_g, self.baselines.components_kg)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": self.scheduler_monitor, "interval": "epoch"},
        }

    # ------------------------------------------------------------------ steps

    def forward(self, x_ng: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(x_ng)

    def loss_per_cell(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The configured loss of each cell in the batch."""
        return self.loss.per_cell(out["recon"], batch[TARGET_KEY])

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        out = self(batch[X_KEY])
        loss_n = self.loss_per_cell(out, batch)
        loss = reduce_per_cell(loss_n, None, self.loss.reduction)
        if stage == "train":
            if self.aux_loss is not None:
                loss = self._add_aux(loss, out["z"], batch)
            self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(loss_n))
            return loss
        if LABEL_KEY in batch:
            self._latents[stage].append((out["z"].detach().float(), batch[LABEL_KEY]))
        target = batch[TARGET_KEY]
        self.metrics[f"{stage}_model"].update(out["recon"], target, loss_n)
        if self.with_baselines:
            for who, recon in self.baselines(batch[X_KEY].float()).items():
                self.metrics[f"{stage}_{who}"].update(recon, target, self.loss.per_cell(recon, target))
        return loss

    def _add_aux(self, recon: torch.Tensor, z_nk: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Log the reconstruction and auxiliary terms; return ``recon + aux_weight · aux``."""
        if LABEL_KEY not in batch:
            raise KeyError("the auxiliary latent loss needs labels: set aux.label_key=<obs column>")
        aux = self.aux_loss(z_nk, batch[LABEL_KEY])
        self.log("train/recon", recon, on_step=False, on_epoch=True, batch_size=len(z_nk))
        self.log("train/aux", aux, on_step=False, on_epoch=True, batch_size=len(z_nk))
        return recon + self.aux_weight * aux

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        out = self(batch[X_KEY])
        return {"z": out["z"].float(), "recon": out["recon"].float()}

    # ------------------------------------------------------------------ epoch ends

    def _log_eval(self, stage: str) -> None:
        for who in SCORED if self.with_baselines else ("model",):
            metric = self.metrics[f"{stage}_{who}"]
            prefix = f"{stage}/" if who == "model" else f"baseline/{who}/{stage}/"
            # Values are already exact global means (torchmetrics syncs sums), so no sync_dist here.
            for name, value in metric.compute().items():
                self.log(prefix + name, value, prog_bar=who == "model" and name in ("loss", "cosine"))
            metric.reset()
        if self._latents[stage]:
            z_nk, labels_n = (torch.cat(parts) for parts in zip(*self._latents[stage], strict=True))
            self.log(f"{stage}/knn_accuracy", knn_label_accuracy(z_nk, labels_n, k=self.knn_k))
            self._latents[stage].clear()

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")
