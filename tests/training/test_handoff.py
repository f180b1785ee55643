"""The datamodule -> module hand-off (TrainingData) and the module's one list of logged metric names."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from exprae.constants import LIBRARY_KEY
from exprae.train import build
from exprae.training.build import build_module

# Synthetic counts with every piece of knowledge the module can use: labels, truth, true per-gene dispersions.
COUNTS = [
    "data=synthetic_counts",
    "data.synthetic.n_cells=300",
    "data.synthetic.n_genes=60",
    "loss=nb",
    "aux.label_key=cell_type",
    "model.latent_dim=4",
    "model.hidden_dims=[32]",
]


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_training_data_carries_what_the_datamodule_fitted(compose_cfg):
    datamodule, module = build(compose_cfg(*COUNTS))
    data = module.data
    assert data is not None and data.n_genes == datamodule.n_genes == module.net.n_genes
    assert data.preprocess is datamodule.preprocess
    assert data.has_labels and data.has_truth and data.mcv is None
    library_n = datamodule.split_dataset("train").per_cell[LIBRARY_KEY]
    assert data.mean_log_library == pytest.approx(float(library_n.clamp_min(1).log().mean()))
    np.testing.assert_array_equal(data.true_dispersion_g, datamodule.adata.var["true_dispersion"].to_numpy())
    table = datamodule.split_table()
    for split in ("train", "val", "test"):
        assert sorted(data.split_obs_names[split]) == sorted(table.obs_name[table.split == split])
    first = next(iter(data.train_chunks(with_batches=True)))
    torch.testing.assert_close(first, next(iter(datamodule.train_chunks())))
    torch.testing.assert_close(data.train_labels(), datamodule.train_labels())


def test_the_module_trains_and_scores_from_the_hand_off_alone(compose_cfg):
    """Fitted with plain dataloaders (no datamodule on the trainer): PCA start, count head, dispersion and
    truth scores and the kNN accuracy all come from what build() attached."""
    datamodule, module = build(compose_cfg(*COUNTS))
    trainer = _trainer(max_epochs=1, limit_train_batches=2, enable_checkpointing=False)
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader(), val_dataloaders=datamodule.val_dataloader())
    assert trainer.datamodule is None and bool(module.baselines.fitted)
    logged = set(trainer.callback_metrics)
    assert {"val/dispersion_pearson", "val/cosine_to_truth", "val/knn_accuracy", "val/nll"} <= logged
    # The count head's learned library starts at the training cells' mean log library size.
    assert module.data.mean_log_library > 0


def test_a_module_without_its_data_says_how_to_attach_it(compose_cfg):
    cfg = compose_cfg("model.latent_dim=4")
    datamodule, built = build(cfg)
    module = build_module(cfg, n_genes=datamodule.n_genes)  # as exprae.load builds it: no data attached
    with pytest.raises(RuntimeError, match=r"attach_data\(datamodule.training_data\(\)\)"):
        module.prepare_start()
    other = build_module(cfg, n_genes=datamodule.n_genes - 1)
    with pytest.raises(ValueError, match=f"the data has {datamodule.n_genes} genes but the network reads"):
        other.attach_data(built.data)


def test_a_logged_key_missing_from_metric_names_is_refused(compose_cfg, monkeypatch):
    """metric_names is enforced: a model key it does not list (here: one planted out) fails the epoch end."""
    datamodule, module = build(compose_cfg("model.latent_dim=4"))
    listed = module.metric_names("val")
    # The list lives in the held-out evaluation (AutoencoderModule.metric_names reads it there).
    monkeypatch.setattr(module.evaluation, "metric_names", lambda stage="val": listed - {"val/cosine_p10"})
    with pytest.raises(
        RuntimeError, match=r"val/cosine_p10 is logged but missing from HeldOutEvaluation\.metric_names"
    ):
        _trainer().validate(module, datamodule=datamodule, verbose=False)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (("data.batch_key=phase", "aux.label_key=bulk_labels"), {"val/ilisi", "val/clisi", "val/batch/G1/cosine"}),
        (
            ("data=synthetic_counts", "data.synthetic.n_cells=300", "data.mcv.fraction=0.5"),
            {"val/mcv_mse", "val/mcv_poisson", "val/cosine_to_truth"},
        ),
    ],
    ids=["batch-covariate-and-labels", "molecule-split"],
)
def test_metric_names_are_exactly_what_validation_logs(compose_cfg, overrides, expected):
    """With batch covariates (per-level and integration scores) and a molecule split, as the defaults test in
    test_bad_input does for the other families: the monitor check's names are the logged ones."""
    datamodule, module = build(compose_cfg(*overrides, "model.latent_dim=4"))
    trainer = _trainer()
    trainer.validate(module, datamodule=datamodule, verbose=False)
    logged = {k for k in trainer.callback_metrics if k.startswith("val/")}
    assert expected <= logged
    assert logged == module.metric_names("val")
