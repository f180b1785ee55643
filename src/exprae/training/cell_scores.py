"""Per-cell held-out scores of the final model and the baselines, saved as ``cells.csv`` in the run directory.

A mean over cells hides who is behind it; two settings scored on the same held-out cells are best compared
cell by cell (a paired difference, ``exprae-compare``'s bootstrap). The callback scores every validation and
test cell of the *final* evaluation (the best checkpoint, after training: Lightning's ``validate``/``test``
calls, not the per-epoch validation inside ``fit``) with the same reconstruction and target as the logged
metrics, and writes one row per cell: its name, split, and cosine / Pearson / MSE of the model and of each
scored baseline (``pca_cosine``, ``meanprofile_mse``, ...). With a molecule split (``data.mcv``) each of them
also gets its MCV scores against the cell's held-out molecules x'' (``mcv_mse``, ``mcv_cosine``,
``mcv_pearson``, ``mcv_poisson``; ``pca_mcv_mse``, ...), exactly the per-cell values behind the logged
``test/mcv_*`` means, so ``exprae-compare`` can pair settings cell by cell under the MCV judge. On synthetic
data that carries its truths, each method also gets its per-cell scores against them (``mse_to_rate_truth``,
``pca_cosine_to_expected_truth``, ``knn_mse_to_truth``, ...), the values behind the logged ``*_to_*truth`` means.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn

from exprae.constants import BATCH_KEY, EXPECTED_TRUTHS, EXTRA_SCORES, INDEX_KEY, MCV_TARGET_KEY, TRUTH_KEY, X_KEY
from exprae.runs import rundir
from exprae.scoring.metrics import per_cell_metrics

SCORER_PREFIX = {"model": "", "pca": "pca_", "mean": "meanprofile_"}  # as exprae.embed names its obs columns
FINAL_STAGES = {TrainerFn.VALIDATING: "val", TrainerFn.TESTING: "test"}


def scored_reconstructions(pl_module: pl.LightningModule, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """``(target_ng, {"model": recon_ng, "pca": ..., "mean": ...})`` as the module scores them, without gradients.

    Count likelihoods are compared in the input's representation, with the input itself as the target.
    """
    target_ng, recons, _ = _scored(pl_module, batch)
    return target_ng, recons


def _scored(pl_module: pl.LightningModule, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict, dict]:
    """:func:`scored_reconstructions` plus the module's raw output (a count model's parameters, for MCV)."""
    with torch.no_grad():
        x_ng = batch[X_KEY].float()
        out = pl_module(x_ng, batch.get(BATCH_KEY))  # batch covariates, as the module's own step
        evaluation = pl_module.evaluation  # the module's held-out scoring (exprae.training.evaluation)
        target_ng = evaluation.eval_target(batch).float()
        recons = {"model": pl_module.reconstruct(out, batch).float()}
        if evaluation.with_baselines:  # the baselines the module scores (module.baselines), as it scores them
            scored = evaluation.baseline_recons(x_ng, batch)
            recons.update({who: r.float() for who, r in scored.items()})
    return target_ng, recons, out


def mcv_cell_scores(
    pl_module: pl.LightningModule, batch: dict[str, torch.Tensor], out: dict, recons: dict[str, torch.Tensor]
) -> dict[str, np.ndarray]:
    """Per-cell MCV scores of the model and each baseline against the held-out molecules x'' (empty without them)."""
    evaluation = pl_module.evaluation
    if evaluation.mcv is None or MCV_TARGET_KEY not in batch:
        return {}
    columns = {}
    with torch.no_grad():
        for who, (pred_ng, nll_n) in evaluation.mcv_predictions(out, batch, recons).items():
            prefix = SCORER_PREFIX.get(who, who + "_")
            for name, values in per_cell_metrics(pred_ng.float(), batch[MCV_TARGET_KEY].float()).items():
                columns[f"{prefix}mcv_{name}"] = values.cpu().numpy()
            columns[f"{prefix}mcv_poisson"] = nll_n.float().cpu().numpy()
    return columns


def truth_cell_scores(
    pl_module: pl.LightningModule, batch: dict[str, torch.Tensor], out: dict, recons: dict[str, torch.Tensor]
) -> dict[str, np.ndarray]:
    """Per-cell scores of the model and each baseline against the synthetic truths the batch carries (else empty).

    As the module scores them: the reconstruction against ``T(E[x])``; each method's prediction of the expected
    profile (:meth:`~exprae.training.AutoencoderModule.expected_profiles`) against ``E[T(x)]`` given the mean or rate.
    """
    columns = {}
    with torch.no_grad():
        scored = [("truth", recons, batch[TRUTH_KEY])] if TRUTH_KEY in batch else []
        truths = {extra: batch[key] for extra, key in EXPECTED_TRUTHS.items() if key in batch}
        if truths:
            preds = pl_module.expected_profiles(out, batch, recons)
            scored += [(extra, preds, truth) for extra, truth in truths.items()]
        for extra, predictions, truth_ng in scored:
            for who, pred_ng in predictions.items():
                prefix = SCORER_PREFIX.get(who, who + "_")
                for name, values in per_cell_metrics(pred_ng.float(), truth_ng.float()).items():
                    columns[prefix + EXTRA_SCORES[extra].format(name)] = values.cpu().numpy()
    return columns


class CellScores(Callback):
    """Score each cell of the final validation and test passes; write ``cells.csv`` into ``dirpath`` after testing."""

    def __init__(self, *, dirpath: str | Path) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)
        self._rows: dict[str, list[dict[str, np.ndarray]]] = {"val": [], "test": []}

    def _stage(self, trainer: pl.Trainer) -> str | None:
        return None if trainer.sanity_checking else FINAL_STAGES.get(trainer.state.fn)

    def _start(self, trainer: pl.Trainer) -> None:
        stage = self._stage(trainer)
        if stage is not None:  # the last call wins: the PCA start is validated too, before training
            self._rows[stage] = []

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer)

    def _collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict[str, torch.Tensor]) -> None:
        stage = self._stage(trainer)
        if stage is None:
            return
        target_ng, recons, out = _scored(pl_module, batch)
        row = {"index": batch[INDEX_KEY].cpu().numpy()}
        for who, recon_ng in recons.items():
            for name, values in per_cell_metrics(recon_ng, target_ng).items():
                row[f"{SCORER_PREFIX.get(who, who + '_')}{name}"] = values.cpu().numpy()
        row.update(mcv_cell_scores(pl_module, batch, out, recons))
        row.update(truth_cell_scores(pl_module, batch, out, recons))
        self._rows[stage].append(row)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collect(trainer, pl_module, batch)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collect(trainer, pl_module, batch)

    def table(self, trainer: pl.Trainer) -> pd.DataFrame:
        """One row per scored cell (all ranks), ordered by split then cell position."""
        frames = []
        data = trainer.lightning_module.data  # the data's hand-off (module.attach_data)
        if data is None:
            raise RuntimeError("CellScores names cells from the module's data: call module.attach_data() first")
        obs_names = data.split_obs_names
        for stage, rows in self._rows.items():
            gathered = _gather(trainer, rows)
            if not gathered:
                continue
            columns = {k: np.concatenate([r[k] for r in gathered]) for k in gathered[0]}
            index = columns.pop("index")
            frame = pd.DataFrame(columns).assign(_pos=index).drop_duplicates("_pos").sort_values("_pos")
            names = obs_names[stage][frame.pop("_pos").to_numpy()]
            frames.append(frame.assign(obs_name=names, split=stage))
        if not frames:
            return pd.DataFrame()
        table = pd.concat(frames, ignore_index=True)
        return table[["obs_name", "split", *[c for c in table.columns if c not in ("obs_name", "split")]]]

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        table = self.table(trainer)
        if trainer.is_global_zero and not table.empty:
            rundir.write_text_atomic(self.dirpath / rundir.CELLS_FILE, table.to_csv(index=False, float_format="%.6g"))


def _gather(trainer: pl.Trainer, rows: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Every rank's rows on every rank (under DDP each rank scored its own shard of the cells)."""
    if trainer.world_size == 1:
        return rows
    parts: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(parts, rows)
    return [row for part in parts for row in part]
