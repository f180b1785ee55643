"""Lightning callbacks: pictures of reconstruction quality in TensorBoard during training."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.trainer.states import TrainerFn

from exprae import reconstruction_plots as plotting
from exprae.constants import TARGET_KEY, X_KEY
from exprae.losses import cosine_similarity


class ReconstructionFigures(pl.Callback):
    """Every ``every_n_epochs`` validation epochs (from epoch 0), log two figures to TensorBoard's Images tab.

    ``reconstruction/cosine_histogram``: per-cell cosine of the model and of the mean-profile and PCA
    baselines on all validation cells; ``reconstruction/cells``: reconstructed against true value per gene for
    the best, median and worst of the first ``max_cells`` validation cells. The network is re-run on the
    validation batch (in eval mode, no gradients), so the LightningModule needs no extra outputs; the cost
    is one more forward pass on the epochs that draw. Without a TensorBoard logger it does nothing.
    """

    def __init__(self, *, every_n_epochs: int = 10, max_cells: int = 1024) -> None:
        super().__init__()
        if int(every_n_epochs) < 1:
            raise ValueError(f"callbacks.reconstruction_figures.every_n_epochs must be >= 1, got {every_n_epochs}")
        if int(max_cells) < 3:
            raise ValueError(f"callbacks.reconstruction_figures.max_cells must be >= 3, got {max_cells}")
        self.every_n_epochs, self.max_cells = int(every_n_epochs), int(max_cells)
        self._drawing = False
        self._cosines: dict[str, list[np.ndarray]] = {}
        self._cells: list[tuple[np.ndarray, np.ndarray]] = []

    @staticmethod
    def _writers(trainer: pl.Trainer) -> list[Any]:
        return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._drawing = (
            trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and trainer.is_global_zero
            and trainer.current_epoch % self.every_n_epochs == 0
            and bool(self._writers(trainer))
        )
        self._cosines, self._cells = {}, []

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: dict[str, torch.Tensor],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._drawing:
            return
        with torch.no_grad():
            x_ng = batch[X_KEY].float()
            out = pl_module(x_ng)
            # As the module scores it: count likelihoods are compared in the input's space, with the input.
            count_loss = getattr(pl_module, "count_loss", False)
            target_ng = (x_ng if count_loss else batch[TARGET_KEY]).float()
            recon_ng = (pl_module.reconstruct(out, batch) if count_loss else out["recon"]).float()
            recons = {"model": recon_ng}
            if getattr(pl_module, "with_baselines", False):
                recons.update(pl_module.baselines(x_ng))
            for who, r in recons.items():
                self._cosines.setdefault(who, []).append(cosine_similarity(r.float(), target_ng).cpu().numpy())
            room = self.max_cells - sum(len(t) for t, _ in self._cells)
            if room > 0:
                self._cells.append((target_ng[:room].cpu().numpy(), recon_ng[:room].cpu().numpy()))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._drawing or not self._cosines:
            return
        epoch = trainer.current_epoch
        cosines = {who: np.concatenate(v) for who, v in self._cosines.items()}
        true_ng = np.concatenate([t for t, _ in self._cells])
        recon_ng = np.concatenate([r for _, r in self._cells])
        cos_n = cosines["model"][: len(true_ng)]
        for writer in self._writers(trainer):
            # add_figure renders on an Agg canvas and closes the figure.
            writer.add_figure(
                "reconstruction/cosine_histogram",
                plotting.histogram_figure(cosines, title=f"validation cells, epoch {epoch}"),
                global_step=trainer.global_step,
            )
            writer.add_figure(
                "reconstruction/cells",
                plotting.cells_figure(true_ng, recon_ng, cos_n, title=f"validation cells, epoch {epoch}"),
                global_step=trainer.global_step,
            )
        self._cosines, self._cells = {}, []
