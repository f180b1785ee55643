"""An AnnData handed to the datamodule from Python (in_memory=), and the device-resident data it can release."""

from __future__ import annotations

import numpy as np
import pytest

from exprae.data import ExpressionDataModule
from exprae.errors import ConfigError


def test_in_memory_anndata_is_the_data_and_is_left_as_it_was(pbmc):
    adata = pbmc.copy()
    x_before = adata.X.copy()
    dm = ExpressionDataModule(dataset=None, in_memory=adata, stratify_key="bulk_labels", batch_size=64)
    dm.setup("fit")
    builtin = ExpressionDataModule(dataset="pbmc68k", stratify_key="bulk_labels", batch_size=64)
    builtin.setup("fit")
    assert dm.source == "in-memory AnnData (700 cells x 765 genes)" == dm.contract()["source"]
    for split in ("train", "val", "test"):  # the same cells, split and preprocessed as from the dataset
        np.testing.assert_array_equal(dm.splits[split], builtin.splits[split])
    np.testing.assert_array_equal(np.asarray(dm.adata.X), np.asarray(builtin.adata.X))
    np.testing.assert_array_equal(adata.X, x_before)  # read as is, never written


@pytest.mark.parametrize(
    "kwargs", [{"dataset": "pbmc68k"}, {"dataset": None, "path": "x.h5ad"}, {"dataset": None, "backed": True}]
)
def test_in_memory_with_another_source_is_refused(pbmc, kwargs):
    with pytest.raises(ConfigError, match="in_memory= is the data itself"):
        ExpressionDataModule(in_memory=pbmc, **kwargs)


def test_device_resident_splits_are_counted_and_released(pbmc):
    dm = ExpressionDataModule(dataset=None, in_memory=pbmc, on_device=True, batch_size=64)
    dm.setup("fit")
    assert dm.device_nbytes == 0
    dm.train_dataloader()  # no trainer: resident on the CPU device, as data.on_device=true forces
    n_train = len(dm.splits["train"])
    assert dm.device_nbytes == n_train * dm.n_genes * 4  # pbmc68k's dense float32 X; the target is the input
    dm.release_device_data()
    assert dm.device_nbytes == 0
