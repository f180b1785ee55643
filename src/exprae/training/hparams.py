"""A run's hyperparameters and final metrics, written so TensorBoard's HParams tab compares a whole sweep.

Lightning's ``TensorBoardLogger.log_hyperparams(params, metrics)`` writes three hparams summaries per run:
the experiment (the list of columns), the session start (this run's values) and the session end. TensorBoard
takes the experiment from whichever run it reads first and ignores the others, so in a sweep whose runs
have different keys (``loss.alpha`` exists for the mixed loss only) some columns silently disappear. Written
without the experiment summary, TensorBoard builds the columns from the union of every run's values instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from pytorch_lightning.core.saving import save_hparams_to_yaml
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from torch.utils.tensorboard.summary import hparams as hparams_summaries


def log_final_hparams(
    loggers: Iterable[Logger], hparams: Mapping[str, Any], metrics: Mapping[str, float], *, step: int
) -> None:
    """Record ``hparams`` with the final ``metrics`` in every logger, then flush and close it."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            _log_tensorboard_session(logger, hparams, metrics, step=step)
        else:
            logger.log_hyperparams(dict(hparams))
            logger.log_metrics(dict(metrics), step=step)
        # Lightning already finalized the loggers after fit/validate/test; finalize again so these last
        # records reach the disk now rather than whenever the process exits.
        logger.finalize("success")


def _log_tensorboard_session(
    logger: TensorBoardLogger, hparams: Mapping[str, Any], metrics: Mapping[str, float], *, step: int
) -> None:
    """Write this run's session start/end summaries (no experiment summary) and the metrics as scalars."""
    logger.hparams.update(hparams)
    # Lightning writes hparams.yaml only if it is missing, and the first finalize (after fit) wrote it empty.
    save_hparams_to_yaml(os.path.join(logger.log_dir, logger.NAME_HPARAMS_FILE), logger.hparams)
    logger.log_metrics(dict(metrics), step=step)
    _, session_start, session_end = hparams_summaries(dict(hparams), dict(metrics))
    # The same private accessor Lightning's own log_hyperparams uses; it reopens the writer if it was closed.
    writer = logger.experiment._get_file_writer()
    writer.add_summary(session_start, step)
    writer.add_summary(session_end, step)
