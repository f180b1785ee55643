"""A resumed run keeps the epochs its CSV log recorded before it was stopped.

Lightning's CSV logger deletes ``metrics.csv`` when it starts writing into a folder that has one, so a run
resumed with ``ckpt_path=last`` used to lose every epoch logged before the interruption. Here the rows
logged up to the checkpoint being resumed are read first, the logger is started (which deletes the file),
and the rows are written back, so the resumed run appends to its own history. Rows logged after that
checkpoint (the part of an epoch that the resumed run repeats) are dropped, so no epoch appears twice.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger

from exprae.runs.checkpoint import read_checkpoint


def keep_logged_history(loggers: list[Any], ckpt_path: str | Path) -> None:
    """Carry the CSV rows logged up to ``ckpt_path`` into the resumed run's ``metrics.csv``."""
    csv_loggers = [lg for lg in loggers if isinstance(lg, CSVLogger)]
    if not csv_loggers:
        return
    ckpt = read_checkpoint(ckpt_path)
    epoch, step = int(ckpt.get("epoch", -1)), int(ckpt.get("global_step", -1))
    for logger in csv_loggers:
        path = Path(logger.log_dir) / "metrics.csv"
        rows, header = _read(path)
        kept = [r for r in rows if _logged_before(r, epoch=epoch, step=step)]
        writer = logger.experiment  # starting the writer deletes the old file
        if not kept:
            continue
        with path.open("w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=header)
            out.writeheader()
            out.writerows(kept)
        writer.metrics_keys = list(header)  # later rows append under the same header (or widen it)


def _read(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    if not path.is_file():
        return [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader), list(reader.fieldnames or [])


def _logged_before(row: dict[str, str], *, epoch: int, step: int) -> bool:
    """Whether a row was logged before the checkpoint of ``epoch``/``step`` was written.

    Rows from Lightning's own logging carry an epoch; rows a callback logs directly (the learning-rate
    monitor) carry only the step, and the one logged at the checkpoint's step opens the next epoch.
    """
    row_epoch, row_step = _number(row.get("epoch")), _number(row.get("step"))
    if row_epoch is not None:
        return row_epoch <= epoch and (row_step is None or row_step <= step)
    return row_step is not None and row_step < step


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return None if value is None or math.isnan(value) else value
