"""The benchmark script runs end to end at a tiny size and writes its table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


@pytest.mark.slow
def test_bench_smallest_size(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--sizes", "600x50", "--batch-sizes", "64", "--epochs", "2"]
    cmd += ["--paths", "exprae-graph", "exprae", "dataloader", "--hidden", "32", "16", "--latent", "8"]
    cmd += ["--threads", "1", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1] / "src")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    df = pd.read_csv(tmp_path / "bench.csv")
    assert list(df.path) == ["exprae-graph", "exprae", "dataloader"]
    assert (df.train_cells_per_s > 0).all() and (df.cells_seen == 2 * 480).all()
    assert df.val_cosine.between(0, 1).all() and (df.x_dataloader > 0).all()
    # Same batches and math on the CPU: the paths end at the same val/cosine after the same cells.
    assert df.val_cosine.max() - df.val_cosine.min() < 0.02
    table = (tmp_path / "bench.md").read_text()
    assert "| exprae-graph |" in table and "× DataLoader" in table
    assert "train cells/s" in done.stdout
