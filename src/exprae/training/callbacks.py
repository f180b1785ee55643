"""Lightning callbacks: a run that is safe to stop, resume and trust, and pictures of its reconstructions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.trainer.states import TrainerFn

from exprae.errors import ConfigError, TrainingDivergedError
from exprae.losses import cosine_similarity
from exprae.scoring import figures as plotting
from exprae.training.cell_scores import scored_reconstructions


class DivergenceGuard(Callback):
    """Stop with a clear error when the training loss or the weights become NaN/inf, or the loss explodes.

    Each step records, on the loss's device, the first step whose loss was not finite, or was more than
    ``max_loss_ratio`` times the loss of the first step (a finite explosion, e.g. ``optimizer.lr=1e3``:
    the loss of a diverging run often stays finite for the whole run, and its metrics would be reported as
    results). Reading that record back costs a host sync, so it happens only every ``check_every_n_steps``
    steps, at each epoch end, and before any checkpoint is written. A checkpoint whose weights are not
    finite is refused, so ``last.ckpt`` and ``best.ckpt`` always hold the last good weights, and the error
    names them. ``max_loss_ratio=null`` turns the explosion check off (losses that may be negative skip it).
    """

    def __init__(self, *, check_every_n_steps: int = 50, max_loss_ratio: float | None = 1e4) -> None:
        super().__init__()
        if int(check_every_n_steps) < 1:
            raise ConfigError(f"callbacks.divergence_guard.check_every_n_steps must be >= 1, got {check_every_n_steps}")
        if max_loss_ratio is not None and not float(max_loss_ratio) > 1:
            raise ConfigError(f"callbacks.divergence_guard.max_loss_ratio must be > 1 or null, got {max_loss_ratio}")
        self.check_every_n_steps = int(check_every_n_steps)
        self.max_loss_ratio = None if max_loss_ratio is None else float(max_loss_ratio)
        self._first_bad_step: torch.Tensor | None = None  # -1 while every loss has been finite
        self._first_bad_loss: torch.Tensor | None = None
        self._start_loss: torch.Tensor | None = None  # the first step's loss, the scale an explosion is judged by
        self._good: tuple[int, int] | None = None  # (epoch, step) of the last checkpoint this guard let through

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        loss = loss.detach().float()
        if self._first_bad_step is None or self._first_bad_step.device != loss.device:
            self._first_bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._first_bad_loss = torch.zeros((), device=loss.device)
            self._start_loss = loss.clone()
        # No host sync here: the step number enters as a kernel scalar, the comparison stays on the device.
        bad = ~torch.isfinite(loss)
        if self.max_loss_ratio is not None:
            bad = bad | ((self._start_loss > 0) & (loss > self.max_loss_ratio * self._start_loss))
        new = bad & (self._first_bad_step < 0)
        self._first_bad_step = torch.where(
            new, torch.full_like(self._first_bad_step, trainer.global_step), self._first_bad_step
        )
        self._first_bad_loss = torch.where(new, loss, self._first_bad_loss)
        if trainer.global_step % self.check_every_n_steps == 0:
            self._check_loss(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_loss(trainer)
        self._check_weights(trainer, pl_module, pl_module.state_dict(), when="at the end of the epoch")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_loss(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # Raising here aborts trainer.save_checkpoint before the file is opened, so the previous file survives.
        self._check_loss(trainer)
        self._check_weights(trainer, pl_module, checkpoint.get("state_dict", {}), when="while saving a checkpoint")
        self._good = (int(checkpoint.get("epoch", -1)), int(checkpoint.get("global_step", -1)))

    def _check_loss(self, trainer: pl.Trainer) -> None:
        if self._first_bad_step is None:
            return
        step = int(self._first_bad_step)  # the one host sync
        if step >= 0:
            value = float(self._first_bad_loss)
            if np.isfinite(value):
                start = float(self._start_loss)
                self._fail(
                    trainer,
                    f"the training loss exploded to {value:.4g} at step {step}, {value / start:.3g} times the first "
                    f"step's loss ({start:.4g}; callbacks.divergence_guard.max_loss_ratio={self.max_loss_ratio:g})",
                )
            self._fail(trainer, f"the training loss became {value} at step {step}")

    def _check_weights(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: Mapping[str, Any], *, when: str
    ) -> None:
        # Trained parameters only: some buffers are legitimately infinite (a count model's "no clipping" bound).
        trained = {name for name, _ in pl_module.named_parameters()}
        tensors = {k: v for k, v in state.items() if k in trained and isinstance(v, torch.Tensor)}
        if not tensors:
            return
        finite = torch.stack([torch.isfinite(v).all() for v in tensors.values()])  # one sync for all tensors
        if bool(finite.all()):
            return
        bad = [k for k, ok in zip(tensors, finite.tolist(), strict=True) if not ok]
        self._fail(trainer, f"{len(bad)} weight tensors became non-finite {when} (e.g. {bad[:3]})")

    def _fail(self, trainer: pl.Trainer, what: str) -> None:
        good = []
        for cb in trainer.checkpoint_callbacks:
            for label, path in (("last", getattr(cb, "last_model_path", "")), ("best", cb.best_model_path)):
                if path and path not in [p for _, p in good]:
                    good.append((label, path))
        if good:
            where = f" (epoch {self._good[0]}, step {self._good[1]})" if self._good else ""
            saved = "; ".join(f"{label}: {path}" for label, path in good)
            tail = f"The last good checkpoints are kept{where}: {saved}. Resume from one with ckpt_path=<path>."
        else:
            tail = "No checkpoint had been saved yet."
        raise TrainingDivergedError(
            f"training diverged in epoch {trainer.current_epoch}: {what}. Stopped without saving those weights. "
            f"{tail} Try a lower optimizer.lr, trainer.gradient_clip_val=1.0, or check the input's scale."
        )


class BatchSeed(Callback):
    """Reseed torch before every training batch from ``(seed, epoch, batch, rank)``.

    Dropout masks then depend only on where the batch is in training, not on how many random numbers were
    drawn before it (Lightning draws some when it builds data iterators and runs a sanity check, and a
    resumed run does that at other moments than an uninterrupted one). So a run resumed from a checkpoint
    continues exactly as the uninterrupted run would have. ``seed=None`` leaves torch's RNG alone.
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.seed = None if seed is None else int(seed)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.seed is None:
            return
        entropy = [self.seed, trainer.current_epoch, batch_idx, trainer.global_rank]
        torch.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1))


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
            raise ConfigError(f"callbacks.reconstruction_figures.every_n_epochs must be >= 1, got {every_n_epochs}")
        if int(max_cells) < 3:
            raise ConfigError(f"callbacks.reconstruction_figures.max_cells must be >= 3, got {max_cells}")
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
        target_ng, recons = scored_reconstructions(pl_module, batch)
        recon_ng = recons["model"]
        for who, r in recons.items():
            self._cosines.setdefault(who, []).append(cosine_similarity(r, target_ng).cpu().numpy())
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
