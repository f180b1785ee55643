"""Lightning callbacks that make a run safe to stop, resume and trust."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from exprae.errors import ConfigError, TrainingDivergedError


class DivergenceGuard(Callback):
    """Stop with a clear error when the training loss or the weights become NaN/inf, and never checkpoint them.

    Each step records, on the loss's device, the first step whose loss was not finite; reading it back costs
    a host sync, so that happens only every ``check_every_n_steps`` steps, at each epoch end, and before any
    checkpoint is written. A checkpoint whose weights are not finite is refused, so ``last.ckpt`` and
    ``best.ckpt`` always hold the last good weights, and the error names them.
    """

    def __init__(self, *, check_every_n_steps: int = 50) -> None:
        super().__init__()
        if int(check_every_n_steps) < 1:
            raise ConfigError(f"callbacks.divergence_guard.check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.check_every_n_steps = int(check_every_n_steps)
        self._first_bad_step: torch.Tensor | None = None  # -1 while every loss has been finite
        self._first_bad_loss: torch.Tensor | None = None
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
        # No host sync here: the step number enters as a kernel scalar, the comparison stays on the device.
        new = (~torch.isfinite(loss)) & (self._first_bad_step < 0)
        self._first_bad_step = torch.where(
            new, torch.full_like(self._first_bad_step, trainer.global_step), self._first_bad_step
        )
        self._first_bad_loss = torch.where(new, loss, self._first_bad_loss)
        if trainer.global_step % self.check_every_n_steps == 0:
            self._check_loss(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_loss(trainer)
        self._check_weights(trainer, pl_module.state_dict(), when="at the end of the epoch")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_loss(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # Raising here aborts trainer.save_checkpoint before the file is opened, so the previous file survives.
        self._check_loss(trainer)
        self._check_weights(trainer, checkpoint.get("state_dict", {}), when="while saving a checkpoint")
        self._good = (int(checkpoint.get("epoch", -1)), int(checkpoint.get("global_step", -1)))

    def _check_loss(self, trainer: pl.Trainer) -> None:
        if self._first_bad_step is None:
            return
        step = int(self._first_bad_step)  # the one host sync
        if step >= 0:
            value = float(self._first_bad_loss)
            self._fail(trainer, f"the training loss became {value} at step {step}")

    def _check_weights(self, trainer: pl.Trainer, state: Mapping[str, Any], *, when: str) -> None:
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
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
