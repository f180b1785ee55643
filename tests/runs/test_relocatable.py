"""A run directory is relocatable: moved or copied, it resumes, reports and loads its own checkpoints."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import exprae
from conftest import train_run
from exprae.runs import rundir
from exprae.runs.checkpoint_callback import RunCheckpoint

RUN = [
    "data.preprocess.n_top_genes=null",
    "model.latent_dim=4",
    "model.hidden_dims=[16]",
    "logger=csv",
    "data.batch_size=32",
    "seed=1",
]


def poisson_counts(path: Path, n_cells: int = 200, n_genes: int = 100) -> Path:
    """A seeded Poisson count matrix written as .h5ad (the shape of the hostile-input report's files)."""
    rng = np.random.default_rng(0)
    adata = ad.AnnData(X=sp.csr_matrix(rng.poisson(1.0, (n_cells, n_genes)).astype(np.float32)))
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.var_names = [f"gene{i}" for i in range(n_genes)]
    adata.write_h5ad(path)
    return path


def csv_rows(run: Path) -> list[dict[str, str]]:
    with (run / "csv" / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # three short trainings
def test_a_moved_run_resumes_into_its_new_place_and_loads_its_own_best(tmp_path):
    data = ["data=h5ad", f"data.path={poisson_counts(tmp_path / 'cells.h5ad')}", *RUN]
    first = train_run(tmp_path / "first", *data, "trainer.max_epochs=2")
    before_move = [
        (int(float(r["epoch"])), r["train/loss_epoch"]) for r in csv_rows(first) if r.get("train/loss_epoch")
    ]
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    train_run(moved, *data, "trainer.max_epochs=3", "ckpt_path=last")

    # The checkpoint callback took over its record, so it replaced best/last instead of writing best-v1 beside them.
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    metrics = json.loads((moved / rundir.METRICS_FILE).read_text())
    assert metrics["best_checkpoint"] == "checkpoints/best.ckpt" and metrics["epochs_trained"] == 3
    assert exprae.load(moved).checkpoint == moved / "checkpoints" / "best.ckpt"
    state = torch.load(moved / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    saved = json.dumps({k: {n: str(v) for n, v in s.items()} for k, s in state.items()})
    assert str(tmp_path) not in saved, "a checkpoint still names an absolute path"

    # The epochs logged before the resume are still in metrics.csv, once each, followed by the new one.
    logged = [(int(float(r["epoch"])), r["train/loss_epoch"]) for r in csv_rows(moved) if r.get("train/loss_epoch")]
    assert [epoch for epoch, _ in logged] == [0, 1, 2], logged
    assert logged[:2] == before_move, "the epochs logged before the resume changed"

    # A copy of the finished run resumes (trains on) in its new place, leaving the original untouched.
    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    before = (moved / "checkpoints" / "last.ckpt").read_bytes()
    train_run(copy, *data, "trainer.max_epochs=4", "ckpt_path=last")
    assert json.loads((copy / rundir.METRICS_FILE).read_text())["epochs_trained"] == 4
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert (moved / "checkpoints" / "last.ckpt").read_bytes() == before


def test_absolute_paths_of_older_checkpoints_are_rebased(tmp_path):
    """A plain ModelCheckpoint saved absolute paths; loaded into another folder they point there, record kept."""
    old, new = tmp_path / "old" / "checkpoints", tmp_path / "new" / "checkpoints"
    callback = RunCheckpoint(dirpath=new, filename="best", monitor="val/loss", save_last=True)
    callback.load_state_dict(
        {
            "monitor": "val/loss",
            "best_model_score": torch.tensor(0.5),
            "best_model_path": str(old / "best.ckpt"),
            "current_score": torch.tensor(0.7),
            "dirpath": str(old),
            "best_k_models": {str(old / "best.ckpt"): torch.tensor(0.5)},
            "kth_best_model_path": str(old / "best.ckpt"),
            "kth_value": torch.tensor(0.5),
            "last_model_path": str(old / "last.ckpt"),
        }
    )
    assert callback.best_model_path == str(new / "best.ckpt")
    assert callback.last_model_path == str(new / "last.ckpt")
    assert list(callback.best_k_models) == [str(new / "best.ckpt")]
    assert float(callback.best_model_score) == 0.5  # the record survives, so a worse epoch does not become best
    assert callback.state_key.startswith("ModelCheckpoint{")  # older runs' callback state is found under it
