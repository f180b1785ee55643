"""experiment=synthetic_grid (issue 22 part 6): its conditions change one setting each, and the grid's script."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONDITIONS = sorted(p.stem for p in (ROOT / "configs" / "synthetic_grid").glob("*.yaml"))


def _script():
    spec = importlib.util.spec_from_file_location("synthetic_grid", ROOT / "scripts" / "synthetic_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_condition_changes_one_generator_setting_from_the_base(compose_cfg):
    base = compose_cfg("experiment=synthetic_grid", "seed=2")
    assert base.data.synthetic.seed == 2  # the generator seed follows `seed`: the seeds are different datasets
    assert base.callbacks.model_checkpoint.monitor == "val/mse_to_rate_truth"
    assert list(base.module.baselines) == ["mean", "pca", "spherical_pca", "knn"]
    assert (base.data.synthetic.library_mean, base.data.synthetic.n_uninformative) == (50.0, 100)
    experiment = yaml.safe_load((ROOT / "configs" / "experiment" / "synthetic_grid.yaml").read_text())
    assert sorted(experiment["hydra"]["sweeper"]["params"]["synthetic_grid"].split(",")) == CONDITIONS
    for condition in CONDITIONS:
        cfg = compose_cfg("experiment=synthetic_grid", f"synthetic_grid={condition}", "seed=2")
        changed = {k for k, v in cfg.data.synthetic.items() if v != base.data.synthetic[k]}
        assert len(changed) == (condition != "base"), (condition, changed)
        assert cfg.model == base.model and cfg.loss == base.loss


@pytest.mark.slow
def test_the_script_pairs_the_losses_cell_by_cell_over_generator_seeds(tmp_path):
    """A grid run in two parts (one condition each) read as one; the paired estimate checked by hand."""
    small = [
        "data.synthetic.n_cells=200",
        "data.synthetic.n_genes=60",
        "data.synthetic.n_uninformative=10",
        "trainer.max_epochs=2",
        "model.hidden_dims=[16]",
    ]
    sweeps = [tmp_path / "base", tmp_path / "dense"]
    for sweep in sweeps:
        command = [sys.executable, "-m", "exprae.train", "-m", "experiment=synthetic_grid"]
        command += [f"synthetic_grid={sweep.name}", "loss=mse,cosine", "seed=0,1", *small, "console=quiet"]
        command += [f"hydra.sweep.dir={sweep}", f"paths.log_dir={tmp_path}", "trainer.deterministic=true"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
    script = _script()
    assert script.main([*map(str, sweeps), "--n-boot", "200"]) == 0
    table = pd.read_csv(sweeps[0] / "synthetic_grid_mse_to_rate_truth.csv").set_index("condition")
    assert list(table.index) == ["base", "dense"]
    assert table.loc["dense", "zeros"] < 0.6 < table.loc["base", "zeros"]
    # By hand: the MSE − cosine estimate is the mean over generator seeds of the per-cell mean difference.
    runs = script.find_runs(sweeps[0])
    diffs = []
    for seed in (0, 1):
        cells = {}
        for run in runs:
            if run.overrides["synthetic_grid"] == "base" and run.overrides["seed"] == str(seed):
                frame = pd.read_csv(run.path / "cells.csv")
                cells[run.overrides["loss"]] = frame[frame["split"] == "test"].set_index("obs_name")
        diffs.append((cells["mse"]["mse_to_rate_truth"] - cells["cosine"]["mse_to_rate_truth"]).mean())
        baseline_mean = cells["mse"]["meanprofile_mse_to_rate_truth"].mean()
        assert np.isclose(cells["cosine"]["meanprofile_mse_to_rate_truth"].mean(), baseline_mean)
    estimate = float(table.loc["base", "mse_minus_cosine"].split()[0])
    assert estimate == pytest.approx(np.mean(diffs), abs=1e-4)
    # The two seeds are two datasets: the same baseline scores differently on each.
    by_seed = [r.metrics["test"]["mean"]["mse_to_rate_truth"] for r in runs if r.overrides["loss"] == "mse"]
    assert len(set(np.round(by_seed, 6))) == len(by_seed)
