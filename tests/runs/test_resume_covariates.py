"""Resuming a run trained with ``data.batch_key`` keeps the levels and codes its first run recorded."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from exprae.data.datasets import synthetic_counts
from exprae.errors import ConfigError, DataError
from exprae.runs import rundir
from exprae.train import build, train

LEVELS = ["s1", "s2", "s3"]
RUN = [
    "data=h5ad",
    "data.preprocess.n_top_genes=null",
    "data.batch_key=sample",
    "model.latent_dim=4",
    "model.hidden_dims=[16]",
    "logger=none",
]


@pytest.fixture
def sample_cells():
    """300 seeded count cells with a categorical ``sample`` column (levels s1, s2, s3)."""
    adata = synthetic_counts(300, 60, seed=5, library_mean=400, store_truth=False)
    rng = np.random.default_rng(1)
    adata.obs["sample"] = pd.Categorical(rng.choice(LEVELS, size=adata.n_obs), categories=LEVELS)
    return adata


def _first_run(compose_cfg, adata, path):
    adata.write_h5ad(path)
    cfg = compose_cfg(*RUN, f"data.path={path}", "trainer.max_epochs=1")
    train(cfg)
    return cfg


def _resume_cfg(cfg, path):
    cfg.data.path = str(path)
    cfg.trainer.max_epochs = 2
    cfg.ckpt_path = "last"
    return cfg


def _files(run_dir):
    """Every file of the run directory with its bytes (what a refused resume must leave as it was)."""
    return {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


@pytest.mark.slow  # trains twice: ~15-30 s on the loaded 2-core machine
def test_resume_codes_cells_by_level_name_whatever_the_files_category_order(compose_cfg, sample_cells, tmp_path):
    cfg = _first_run(compose_cfg, sample_cells, tmp_path / "cells.h5ad")
    out_dir = tmp_path / "run"
    before = rundir.read_json(out_dir / rundir.CONTRACT_FILE)["batch_categories"]
    assert before == {"sample": LEVELS}

    reordered = sample_cells.copy()  # the same cells; the column's categories listed the other way round
    reordered.obs["sample"] = reordered.obs["sample"].cat.reorder_categories(LEVELS[::-1])
    reordered.write_h5ad(tmp_path / "reordered.h5ad")
    cfg = _resume_cfg(cfg, tmp_path / "reordered.h5ad")
    # The datamodule a resume builds codes each cell as the first run did (s1 -> 0), not by the file's order.
    datamodule, _ = build(cfg, recorded_levels=before)
    expected = sample_cells.obs["sample"].cat.codes.to_numpy()
    np.testing.assert_array_equal(datamodule.covariates.codes_nk[:, 0], expected)
    assert datamodule.covariates.categories == {"sample": LEVELS}

    metrics = train(cfg)
    assert metrics["epochs_trained"] == 2
    assert rundir.read_json(out_dir / rundir.CONTRACT_FILE)["batch_categories"] == {"sample": LEVELS}
    by_batch = json.loads((out_dir / rundir.METRICS_FILE).read_text())["by_batch"]
    assert by_batch["levels"] == LEVELS


def test_resume_with_a_renamed_level_or_without_the_batch_key_is_refused_before_anything_is_written(
    compose_cfg, sample_cells, tmp_path
):
    cfg = _first_run(compose_cfg, sample_cells, tmp_path / "cells.h5ad")
    out_dir = tmp_path / "run"
    kept = _files(out_dir)

    renamed = sample_cells.copy()
    renamed.obs["sample"] = renamed.obs["sample"].cat.rename_categories({"s2": "donor2"})
    renamed.write_h5ad(tmp_path / "renamed.h5ad")
    cfg = _resume_cfg(cfg, tmp_path / "renamed.h5ad")
    with pytest.raises(
        DataError, match=r"'sample' .* level\(s\) \['donor2'\] .*known levels: \['s1', 's2', 's3'\].*rename the level"
    ):
        train(cfg)
    after = _files(out_dir)
    # The run's own files are untouched; the refusal is recorded next to them in error.txt, nothing else.
    assert {k: v for k, v in after.items() if str(k) != rundir.ERROR_FILE} == kept
    assert "donor2" in (out_dir / rundir.ERROR_FILE).read_text()

    cfg.data.path = str(tmp_path / "cells.h5ad")
    cfg.data.batch_key = None
    with pytest.raises(ConfigError, match=r"trained with data.batch_key=\['sample'\].*now data.batch_key=None"):
        train(cfg)
    assert {k: v for k, v in _files(out_dir).items() if str(k) != rundir.ERROR_FILE} == kept
