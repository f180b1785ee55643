"""The installed commands a user types: exprae-train (a multirun), exprae-compare and exprae-predict.

They run as the console scripts pip wrote next to this interpreter, not as ``python -m``, so a broken entry
point in pyproject.toml, a missing config directory or an import that only works from the source tree fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

BIN = Path(sys.executable).parent


def _command(name: str) -> str:
    path = BIN / name
    # `make install` puts the scripts here; a missing one is an installation bug, not a reason to skip.
    assert path.is_file(), f"{name} is not installed next to {sys.executable}; run make install"
    return str(path)


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "EXPRAE_ROOT": str(cwd)}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow  # two short trainings, a report and a prediction in fresh processes: ~1 minute
def test_installed_train_compare_predict(tmp_path, pbmc):
    sweep = tmp_path / "sweep"
    _run(
        _command("exprae-train"), "-m", "seed=0,1", "trainer.max_epochs=1", "model.latent_dim=8", "logger=none",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )  # fmt: skip
    runs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(runs) == 2 and {json.loads((r / "metrics.json").read_text())["seed"] for r in runs} == {0, 1}

    report = _run(_command("exprae-compare"), str(sweep), "--no-plots", cwd=tmp_path)
    assert "2 finished run(s)" in report.stdout and (sweep / "summary.md").is_file()

    cells = tmp_path / "cells.h5ad"
    pbmc[:50].copy().write_h5ad(cells)
    out = tmp_path / "predicted.h5ad"
    _run(_command("exprae-predict"), f"ckpt={runs[0]}", f"data.path={cells}", f"out={out}", cwd=tmp_path)
    predicted = ad.read_h5ad(out)
    assert predicted.obsm["X_exprae"].shape == (50, 8) and np.isfinite(predicted.obsm["X_exprae"]).all()
