"""After a sweep: an index of its job folders (``jobs.csv``: folder, overrides) and the command that compares them.

Hydra numbers a sweep's job folders 0, 1, 2, ...; the index says which folder holds which setting without
opening each ``.hydra/overrides.yaml``, and the closing line tells the user what to run next.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from exprae.report.sweep_runs import OVERRIDES_FILE, _natural_key
from exprae.runs import rundir

INDEX_FILE = "jobs.csv"


def write_index(sweep_dir: str | Path) -> Path | None:
    """Write ``jobs.csv`` (one row per job folder: its name, overrides and whether it finished); None if no jobs."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for overrides in sorted(sweep_dir.glob(f"*/{OVERRIDES_FILE}"), key=_natural_key):
        job = overrides.parent.parent
        items = yaml.safe_load(overrides.read_text()) or []
        rows.append(
            {
                "job": job.name,
                "overrides": " ".join(str(item) for item in items),
                "finished": (job / rundir.METRICS_FILE).is_file(),
            }
        )
    if not rows:
        return None
    return rundir.write_text_atomic(sweep_dir / INDEX_FILE, pd.DataFrame(rows).to_csv(index=False))


class SweepIndex(HydraCallback):
    """Hydra callback: at the end of a multirun, write ``jobs.csv`` and print the ``exprae-compare`` command."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = OmegaConf.select(config, "hydra.sweep.dir")
        if sweep_dir is None or not Path(sweep_dir).is_dir():
            return
        index = write_index(sweep_dir)
        listed = f"job folders listed in {index}; " if index is not None else ""
        print(f"\n{listed}compare the runs with:\n  exprae-compare {sweep_dir}\n", flush=True)
