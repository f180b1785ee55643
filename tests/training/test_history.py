"""A run's console, history.csv, best epoch, stop reason and per-cell scores (cells.csv), on real pbmc68k runs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import exprae
from conftest import train_run
from exprae.runs import rundir
from exprae.training.console import quiet_lightning, resolve_console


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """Early stopping forced deterministically: an improvement must exceed 10, so epoch 2 never improves."""
    return train_run(
        tmp_path_factory.mktemp("stopped"),
        "trainer.max_epochs=6",
        "model.latent_dim=8",
        "callbacks.early_stopping.patience=1",
        "callbacks.early_stopping.min_delta=10",
        "console=lines",
    )


def test_history_has_one_row_per_epoch_and_the_start(stopped_run):
    history = pd.read_csv(stopped_run / rundir.HISTORY_FILE)
    assert history["epoch"].tolist() == [0, 1, 2]  # 0: the PCA start, scored before training
    assert {"train/loss", "val/loss", "val/cosine", "val/mse", "lr", "seconds"} <= set(history.columns)
    assert history["train/loss"].isna().tolist() == [True, False, False]  # no training before epoch 1
    metrics = json.loads((stopped_run / rundir.METRICS_FILE).read_text())
    assert metrics["start"]["score"] == pytest.approx(history.loc[0, "val/loss"], rel=1e-6)


def test_best_epoch_and_why_training_stopped(stopped_run):
    metrics = json.loads((stopped_run / rundir.METRICS_FILE).read_text())
    history = pd.read_csv(stopped_run / rundir.HISTORY_FILE)
    assert metrics["best_epoch"] == int(history.loc[history["val/loss"].idxmin(), "epoch"])
    assert metrics["stopped"] == "early stopping after epoch 2: val/loss did not improve for 1 epochs"
    # The reported validation score is the best epoch's: the best checkpoint is what is validated.
    assert metrics["val"]["model"]["loss"] == pytest.approx(history["val/loss"].min(), rel=1e-5)


def test_loaded_model_has_the_history(stopped_run):
    model = exprae.load(stopped_run, device="cpu")
    assert model.history["epoch"].tolist() == [0, 1, 2]


def test_cells_csv_holds_every_held_out_cell_and_averages_to_the_reported_metrics(stopped_run):
    cells = pd.read_csv(stopped_run / rundir.CELLS_FILE)
    split = pd.read_csv(stopped_run / rundir.SPLIT_FILE).set_index("obs_name")["split"]
    assert cells["split"].value_counts().to_dict() == {"val": 70, "test": 70}
    assert (split.loc[cells["obs_name"]].to_numpy() == cells["split"].to_numpy()).all()
    assert not cells["obs_name"].duplicated().any()
    metrics = json.loads((stopped_run / rundir.METRICS_FILE).read_text())
    for stage in ("val", "test"):
        rows = cells[cells["split"] == stage]
        for prefix, who in (("", "model"), ("pca_", "pca"), ("meanprofile_", "mean")):
            for name in ("cosine", "pearson", "mse"):
                assert rows[prefix + name].mean() == pytest.approx(metrics[stage][who][name], abs=2e-5), (stage, who)


def test_lines_mode_prints_one_line_per_epoch_and_the_stop(tmp_path, capsys):
    train_run(tmp_path / "run", "trainer.max_epochs=2", "model.latent_dim=8", "console=lines")
    out = capsys.readouterr().out
    assert "epoch   0 (the PCA start, before training) val/loss" in out
    assert "epoch   1/2 train/loss" in out and "epoch   2/2 train/loss" in out
    assert "stopped: reached trainer.max_epochs=2; best epoch" in out
    assert "exprae run" in out and "PCA (8 comps)" in out
    assert "\r" not in out and "it/s" not in out


def test_quiet_lightning_holds_back_info_lines_and_restores():
    chatty = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    before = chatty.level
    with quiet_lightning():
        assert not chatty.isEnabledFor(logging.INFO)  # GPU/TPU lines, adverts, "Restoring states ..."
        assert chatty.isEnabledFor(logging.WARNING)
    assert chatty.level == before


def test_console_auto_follows_the_terminal(monkeypatch):
    class Stream:
        def __init__(self, tty: bool) -> None:
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    monkeypatch.setattr(sys, "stdout", Stream(False))
    assert resolve_console("auto", progress_bar=True) == "lines"
    monkeypatch.setattr(sys, "stdout", Stream(True))
    assert resolve_console("auto", progress_bar=True) == "bar"
    assert resolve_console("auto", progress_bar=False) == "lines"
    assert resolve_console("quiet", progress_bar=True) == "quiet"
    with pytest.raises(Exception, match="console='loud' is not one of"):
        resolve_console("loud", progress_bar=True)


@pytest.mark.slow  # a fresh interpreter imports torch and Lightning
def test_redirected_cli_output_is_plain_and_train_log_complete(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(exprae.__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "exprae.train", "trainer.max_epochs=2", "model.latent_dim=8"]
    cmd += ["trainer.accelerator=cpu", "console=quiet", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout + proc.stderr
    for noise in ("GPU available", "TPU available", "Tip:", "Restoring states", "Loaded model weights", "FLOPs"):
        assert noise not in printed, noise
    assert "\r" not in printed and "it/s" not in printed  # no progress-bar frames in a redirected output
    assert "epoch   1/2" not in proc.stdout  # quiet: no epoch lines on the console ...
    assert "stopped: reached trainer.max_epochs=2" in proc.stdout and "PCA (8 comps)" in proc.stdout
    log = (run_dir / "train.log").read_text()
    assert "epoch   1/2 train/loss" in log and "epoch   2/2" in log  # ... but in train.log
    assert "stopped: reached" in log and "mean profile" in log and "PCA (8 comps)" in log


def test_run_report_shows_the_results_the_curves_and_the_worst_cells(stopped_run):
    report = (stopped_run / "report.html").read_text()
    metrics = json.loads((stopped_run / rundir.METRICS_FILE).read_text())
    assert f"<td>{metrics['test']['model']['cosine']:.4f}</td>" in report
    assert f"<td>{metrics['test']['pca']['cosine']:.4f}</td>" in report
    assert report.count('src="data:image/png;base64,') == 2  # learning curves and the per-cell histogram
    assert "best epoch" in report and "early stopping after epoch 2" in report
    cells = pd.read_csv(stopped_run / rundir.CELLS_FILE)
    worst = cells[cells["split"] == "test"].nsmallest(10, "cosine")["obs_name"]
    assert all(f"<td class=text>{name}</td>" in report for name in worst)
