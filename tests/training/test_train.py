"""End-to-end runs of the Hydra entry point on the real pbmc68k data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from hydra.errors import InstantiationException

from exprae.runs import rundir
from exprae.train import format_report, train


@pytest.mark.parametrize("loss", ["mse", "cosine", "mixed", "pearson"])
def test_fast_dev_run_every_loss(compose_cfg, loss):
    cfg = compose_cfg(f"loss={loss}", "trainer.fast_dev_run=true", "callbacks=none", "logger=none")
    metrics = train(cfg)
    for stage in ("val", "test"):
        for who in ("model", "mean", "pca"):
            assert math.isfinite(metrics[stage][who]["cosine"]), (stage, who)


def test_short_run_writes_run_directory(compose_cfg):
    cfg = compose_cfg("trainer.max_epochs=3", "model.latent_dim=8")
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    saved = json.loads((out / rundir.METRICS_FILE).read_text())
    assert saved["val"]["model"]["cosine"] == pytest.approx(metrics["val"]["model"]["cosine"])
    values = [v for stage in ("val", "test") for who in saved[stage].values() for v in who.values()]
    assert values and all(math.isfinite(v) for v in values)
    # PCA at the latent size is scored on the same cells, with as many components as the latent space.
    assert saved["latent_dim"] == 8
    assert (out / "checkpoints" / "best.ckpt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    contract = json.loads((out / rundir.CONTRACT_FILE).read_text())
    assert contract["n_genes"] == 765 and len(contract["var_names"]) == 765
    split = pd.read_csv(out / rundir.SPLIT_FILE)
    assert split["split"].value_counts().to_dict() == {"train": 560, "val": 70, "test": 70}
    env = json.loads((out / rundir.ENVIRONMENT_FILE).read_text())
    assert env["seed"] == 0 and env["torch"]


def test_pca_start_is_never_far_below_pca(compose_cfg):
    """The default PCA-started model, early-stopped on val loss, ends at least at PCA's held-out level."""
    cfg = compose_cfg("trainer.max_epochs=5")
    metrics = train(cfg)
    assert metrics["val"]["model"]["mse"] <= metrics["val"]["pca"]["mse"] + 1e-4
    assert metrics["test"]["model"]["cosine"] >= metrics["test"]["pca"]["cosine"] - 0.01


def test_pca_start_is_kept_as_best_when_no_epoch_beats_it(compose_cfg):
    """Forced: a weight decay that shrinks every weight by ~30% a step makes each epoch worse than the start.

    The PCA start must then be what ``best.ckpt`` holds, what is validated and tested, and what metrics.json
    reports under ``start``; the model's held-out scores are then PCA's own (the start is exact PCA).
    """
    cfg = compose_cfg(
        "trainer.max_epochs=2", "model.latent_dim=8", "optimizer.weight_decay=1000", "logger=none", "model.dropout=0"
    )
    metrics = train(cfg)
    start = metrics["start"]
    assert start["kept"] is True and start["monitor"] == "val/loss"
    saved = json.loads((Path(cfg.paths.output_dir) / rundir.METRICS_FILE).read_text())
    assert saved["start"] == start and saved["best_checkpoint"] == "checkpoints/best.ckpt"
    for stage in ("val", "test"):
        for name in ("mse", "cosine", "pearson"):
            # float32 forward of the same linear map, summed in another order: agreement to ~1e-6 relative.
            assert metrics[stage]["model"][name] == pytest.approx(metrics[stage]["pca"][name], rel=1e-4), (stage, name)
    assert metrics["val"]["model"]["loss"] == pytest.approx(start["score"], rel=1e-4)
    # The shrunk network really is worse: last.ckpt (the trained weights) is far from PCA on validation cells.
    from exprae.runs.checkpoint import read_checkpoint

    last = read_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    best = read_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt")
    key = next(k for k in best["state_dict"] if k.endswith("weight") and best["state_dict"][k].abs().sum() > 0)
    assert last["state_dict"][key].norm() < 0.5 * best["state_dict"][key].norm()


def test_report_columns_stay_aligned_for_long_loss_names():
    scores = {who: {"cosine": 0.5, "pearson": 0.4, "mse": 0.1} for who in ("model", "mean", "pca")}
    metrics = {"loss": "NegativeBinomialNLL", "latent_dim": 16, "val": scores, "test": scores}
    lines = format_report(metrics).splitlines()
    assert "exprae (NegativeBinomialNLL)" in lines[1]
    # Fixed-width number columns: aligned exactly when every row (header included) has the same length.
    assert len({len(line) for line in lines}) == 1, lines
    assert lines[1].split()[-6:] == ["0.5000", "0.4000", "0.1000"] * 2


def test_a_spherical_pca_start_is_scored_and_competes_for_the_checkpoint(compose_cfg):
    """As the PCA start: scored on validation cells before training, and kept as best.ckpt when no epoch beats
    it (forced by the weight decay of the test above); the model's scores are then the spherical start's."""
    cfg = compose_cfg(
        "trainer.max_epochs=2",
        "model.latent_dim=8",
        "model.init=spherical_pca",
        "optimizer.weight_decay=1000",
        "logger=none",
        "model.dropout=0",
    )
    metrics = train(cfg)
    start = metrics["start"]
    assert start["kept"] is True and start["monitor"] == "val/loss"
    assert metrics["val"]["model"]["loss"] == pytest.approx(start["score"], rel=1e-4)
    assert metrics["val"]["model"]["mse"] != pytest.approx(metrics["val"]["pca"]["mse"], rel=1e-3)


def test_spherical_pca_init_is_refused_with_a_batch_seen_by_the_encoder(compose_cfg):
    """Refused where the network is built, before the run directory gets anything."""
    cfg = compose_cfg("model.init=spherical_pca", "data.batch_key=phase", "logger=none")
    with pytest.raises(InstantiationException, match=r"model\.init=spherical_pca has no per-batch start"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / rundir.CONTRACT_FILE).exists()
