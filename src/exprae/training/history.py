"""The per-epoch history of a run (``history.csv``, scvi-tools' ``model.history``), its best epoch and why it stopped.

Epochs are counted from 1 as a user reads them ("epoch 3 of 200"); epoch 0 is the model before training
(with ``model.init=pca`` the PCA start, scored on the validation cells before the first step). The history
travels in the checkpoints, so a resumed run's ``history.csv`` holds every epoch, not only those after the
restart.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn

from exprae.runs import rundir
from exprae.training.console import emit

EPOCH_LINE_METRICS = ("train/loss", "val/loss", "val/cosine")  # the numbers shown on each epoch's line


class History(Callback):
    """Record one row per epoch (train and validation metrics, learning rate, seconds); write ``history.csv``.

    With ``show_epochs`` each epoch is also printed as one line (``exprae-train`` sets it when the progress
    bar is off: a redirected stdout, ``console=lines`` or ``quiet``), a ``*`` marking a new best on the
    checkpoint's monitored metric. At the end of training it says why training stopped and which epoch is best.
    """

    def __init__(self, *, dirpath: str | Path, show_epochs: bool = True) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)
        self.show_epochs = bool(show_epochs)
        self.rows: list[dict[str, float]] = []
        self.stopped: str | None = None
        self._t0 = 0.0

    # ---------------------------------------------------------------- what is best

    @staticmethod
    def _monitor(trainer: pl.Trainer) -> tuple[str | None, str]:
        checkpoint = trainer.checkpoint_callback
        return (getattr(checkpoint, "monitor", None), getattr(checkpoint, "mode", "min"))

    def best(self, trainer: pl.Trainer) -> dict[str, float] | None:
        """The row with the best monitored value (the earliest on a tie, as ModelCheckpoint keeps the first)."""
        monitor, mode = self._monitor(trainer)
        scored = [r for r in self.rows if monitor and not math.isnan(r.get(monitor, math.nan))]
        if not scored:
            return None
        pick = min if mode == "min" else max
        return pick(scored, key=lambda r: r[monitor])

    # ---------------------------------------------------------------- recording

    def _row(self, trainer: pl.Trainer, epoch: int) -> dict[str, float]:
        row: dict[str, float] = {"epoch": epoch}
        for key, value in trainer.callback_metrics.items():
            if key.endswith("_step") or not key.startswith(("train/", "val/")):
                continue
            row[key.removesuffix("_epoch")] = float(value)
        if trainer.optimizers:
            row["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        return row

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The model before training: a validate() call before fit (exprae-train scores the PCA start there).
        if trainer.state.fn == TrainerFn.VALIDATING and trainer.global_step == 0 and not self.rows:
            self.rows.append(self._row(trainer, 0))
            if self.show_epochs:
                init = getattr(getattr(pl_module, "net", None), "init", None)
                what = {"pca": "the PCA start", "spherical_pca": "the spherical PCA start"}.get(init, "start")
                emit(f"epoch   0 ({what}, before training) {self._numbers(self.rows[-1])}", progress=True)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch + 1
        before = self.best(trainer)
        row = self._row(trainer, epoch)
        row["seconds"] = round(time.monotonic() - self._t0, 3)
        self.rows = [r for r in self.rows if r["epoch"] < epoch] + [row]  # a resumed epoch replaces its old row
        if self.show_epochs:
            improved = self.best(trainer) is row and before is not row
            width = len(str(trainer.max_epochs)) if trainer.max_epochs and trainer.max_epochs > 0 else 3
            emit(
                f"epoch {epoch:>{max(width, 3)}}/{trainer.max_epochs} {self._numbers(row)}"
                f"{' *' if improved else '  '} {row['seconds']:.1f} s",
                progress=True,
            )

    @staticmethod
    def _numbers(row: dict[str, float]) -> str:
        return "  ".join(f"{k} {row[k]:.4f}" for k in EPOCH_LINE_METRICS if k in row)

    # ---------------------------------------------------------------- the end of training

    def stop_reason(self, trainer: pl.Trainer) -> str:
        """Why training ended, in words."""
        stopper = trainer.early_stopping_callback
        epochs = trainer.current_epoch
        if stopper is not None and stopper.stopped_epoch > 0:
            return (
                f"early stopping after epoch {stopper.stopped_epoch + 1}: {stopper.monitor} did not improve for "
                f"{stopper.patience} epochs"
            )
        if trainer.interrupted:
            return f"interrupted after epoch {epochs}"
        if trainer.max_epochs is not None and epochs >= trainer.max_epochs:
            return f"reached trainer.max_epochs={trainer.max_epochs}"
        return f"stopped after epoch {epochs} (trainer.max_steps or a time limit)"

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stopped = self.stop_reason(trainer)
        best = self.best(trainer)
        monitor, _ = self._monitor(trainer)
        text = f"stopped: {self.stopped}"
        if best is not None:
            label = " (the model before training)" if best["epoch"] == 0 else ""
            text += f"; best epoch {int(best['epoch'])}{label}: {monitor} {best[monitor]:.4f}"
        if trainer.is_global_zero:
            emit(text)
            rundir.write_text_atomic(self.dirpath / rundir.HISTORY_FILE, self.table().to_csv(index=False))

    def table(self) -> pd.DataFrame:
        """The history as a DataFrame, one row per epoch (0: before training)."""
        table = pd.DataFrame(self.rows)
        if table.empty:
            return table
        table["epoch"] = table["epoch"].astype(int)
        order = ["epoch", *sorted(c for c in table if c.startswith("train/")), *EPOCH_LINE_METRICS[1:]]
        order += [c for c in table if c.startswith("val/") and c not in order]
        return table[[c for c in dict.fromkeys(order + list(table.columns)) if c in table]]

    # ---------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [dict(r) for r in state_dict.get("rows", [])]
