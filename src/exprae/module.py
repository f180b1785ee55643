"""The LightningModule: trains the network with the configured loss, scores it and the baselines per cell."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from exprae.baselines import Baselines
from exprae.constants import INDEX_KEY, TARGET_KEY, TRUTH_KEY, X_KEY
from exprae.losses import ReconstructionLoss, reduce_per_cell
from exprae.masking import hidden_entries
from exprae.metrics import ReconstructionMetrics
from exprae.nn import AutoEncoder

EVAL_STAGES = ("val", "test")
SCORED = ("model", "mean", "pca")  # the model and the two baselines, scored on the same cells
# Further scores of the same reconstructions, and how their metric names are logged: against the noise-free
# truth (synthetic data), and on entries hidden from the encoder (the imputation score, ``mask_fraction``).
EXTRA_SCORES = {"truth": "{}_to_truth", "masked": "masked_{}"}


class AutoencoderModule(pl.LightningModule):
    """Owns the loss, the optimizer and the metrics; the network itself is a plain ``nn.Module``.

    Logged keys: ``train/loss`` every ``log_every_n_steps``; each validation epoch ``val/{loss, mse, cosine,
    pearson, cosine_median, cosine_p10}`` for the model and ``baseline/{mean,pca}/val/...`` for the
    baselines; the same under ``test/`` after testing. When batches carry the noise-free truth
    (``true_mean``) also ``val/{cosine,pearson,mse,...}_to_truth``; with ``mask_fraction > 0`` also
    ``val/masked_{cosine,pearson,mse,...}`` on entries hidden from the encoder (:mod:`exprae.masking`).
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
        mask_fraction: float = 0.0,
        mask_seed: int = 0,
    ) -> None:
        super().__init__()
        self.net = net
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_monitor = scheduler_monitor
        self.with_baselines = baselines
        if not 0.0 <= float(mask_fraction) < 1.0:
            raise ValueError(f"module.mask_fraction must lie in [0, 1), got {mask_fraction}")
        self.mask_fraction, self.mask_seed = float(mask_fraction), int(mask_seed)
        # Baselines are needed for the PCA start even when they are not reported.
        self.baselines = Baselines(net.n_genes, net.latent_dim)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{who}{suffix}": ReconstructionMetrics()
                for stage in EVAL_STAGES
                for who in SCORED
                for suffix in ("", *(f"_{extra}" for extra in EXTRA_SCORES))
            }
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
            self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(loss_n))
            return loss
        target = batch[TARGET_KEY]
        self.metrics[f"{stage}_model"].update(out["recon"], target, loss_n)
        recons = {"model": out["recon"]}
        if self.with_baselines:
            for who, recon in self.baselines(batch[X_KEY].float()).items():
                self.metrics[f"{stage}_{who}"].update(recon, target, self.loss.per_cell(recon, target))
                recons[who] = recon
        if TRUTH_KEY in batch:
            for who, recon in recons.items():
                self.metrics[f"{stage}_{who}_truth"].update(recon, batch[TRUTH_KEY])
        if self.mask_fraction > 0:
            self._score_masked(batch, stage)
        return loss

    def _score_masked(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        """Hide entries of the input, reconstruct, and score the model and baselines on the hidden ones."""
        x_ng = batch[X_KEY]
        hidden_ng = hidden_entries(
            x_ng, batch[INDEX_KEY], fraction=self.mask_fraction, seed=self.mask_seed, stream=stage
        )
        x_masked_ng = x_ng.masked_fill(hidden_ng, 0.0)
        recons = {"model": self(x_masked_ng)["recon"]}
        if self.with_baselines:
            recons.update(self.baselines(x_masked_ng.float()))
        for who, recon in recons.items():
            self.metrics[f"{stage}_{who}_masked"].update(recon, batch[TARGET_KEY], mask_ng=hidden_ng)

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
            prefix = f"{stage}/" if who == "model" else f"baseline/{who}/{stage}/"
            for suffix, pattern in (("", "{}"), *((f"_{e}", p) for e, p in EXTRA_SCORES.items())):
                metric = self.metrics[f"{stage}_{who}{suffix}"]
                if metric.update_count == 0:  # no truth in this data, or masking off
                    continue
                # Values are already exact global means (torchmetrics syncs sums), so no sync_dist here.
                for name, value in metric.compute().items():
                    self.log(
                        prefix + pattern.format(name),
                        value,
                        prog_bar=who == "model" and suffix == "" and name in ("loss", "cosine"),
                    )
                metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")
