"""The benchmark script runs end to end at a tiny size and writes its table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from exprae.data.datasets import synthetic_counts_sparse

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


def test_sparse_generator_is_seeded_sparse_and_thread_independent():
    a = synthetic_counts_sparse(3000, 2000, seed=4, chunk_cells=700)
    b = synthetic_counts_sparse(3000, 2000, seed=4, chunk_cells=700, n_threads=1)
    assert a.shape == (3000, 2000) and a.X.dtype == "float32" and a.X.format == "csr"
    assert (a.X != b.X).nnz == 0
    assert 0.07 < a.X.nnz / (3000 * 2000) < 0.13  # ~10% non-zero, as the benchmark sizes promise
    assert a.obs["cell_type"].nunique() == 8 and (a.X.data == a.X.data.round()).all()
    assert (synthetic_counts_sparse(3000, 2000, seed=5, chunk_cells=700).X != a.X).nnz > 0


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
