"""What each seed varies, through the real configs: ``data.split_seed`` picks the held-out cells, ``seed`` the batches.

A seed sweep is read as "the same held-out cells, another initialisation and batch order"; these tests pin both
halves, in memory and streamed from disk (``data.backed=true``), and that ``data.stratify_key`` reaches the split.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import pytest

from exprae.constants import INDEX_KEY
from exprae.data import ExpressionDataModule, split_cells

# The h5ad config normalises and logs counts; pbmc68k's X is already scaled, so those steps are switched off.
PLAIN_H5AD = ["data.preprocess.normalize_total=null", "data.preprocess.log1p=false", "data.preprocess.n_top_genes=null"]


def _datamodule(compose_cfg, *overrides: str) -> ExpressionDataModule:
    dm: ExpressionDataModule = hydra.utils.instantiate(compose_cfg(*overrides).data)
    dm.setup("fit")
    return dm


def _train_order(dm: ExpressionDataModule, epoch: int = 0) -> np.ndarray:
    """The training cells (positions in the split) in the order one epoch's batches present them."""
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return np.concatenate([batch[INDEX_KEY].numpy() for batch in loader])


@pytest.fixture
def pbmc_h5ad(pbmc, tmp_path) -> Path:
    path = tmp_path / "pbmc.h5ad"
    pbmc.write_h5ad(path)
    return path


@pytest.mark.parametrize("backed", [False, True], ids=["in_memory", "backed"])
def test_split_follows_split_seed_only_and_batches_follow_seed(compose_cfg, pbmc_h5ad, backed):
    data = ["data=h5ad", f"data.path={pbmc_h5ad}", *PLAIN_H5AD, f"data.backed={str(backed).lower()}"]
    if backed:
        data += ["data.chunk_size=64", "data.buffer_chunks=2"]  # several chunks, so the chunk order can change
    seed0 = _datamodule(compose_cfg, *data, "seed=0")
    seed1 = _datamodule(compose_cfg, *data, "seed=1")
    other_split = _datamodule(compose_cfg, *data, "seed=0", "data.split_seed=1")

    # The held-out cells do not move with `seed`, and do move with `data.split_seed`.
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(seed0.splits[name], seed1.splits[name], err_msg=name)
    assert not np.array_equal(seed0.splits["val"], other_split.splits["val"])
    assert not np.array_equal(seed0.splits["test"], other_split.splits["test"])

    # The batch order moves with `seed` (every training cell still seen once), and only with it.
    order0, order1 = _train_order(seed0), _train_order(seed1)
    assert sorted(order0) == sorted(order1) == list(range(len(seed0.splits["train"])))
    assert not np.array_equal(order0, order1)
    np.testing.assert_array_equal(order0, _train_order(_datamodule(compose_cfg, *data, "seed=0")))
    # Another split with the same seed still has its own cells; the order is not tied to the split seed.
    assert seed0.batch_seed == other_split.batch_seed == 0 and seed1.batch_seed == 1


def test_batch_seed_can_be_held_fixed_while_seed_varies(compose_cfg):
    a = _datamodule(compose_cfg, "seed=0", "data.batch_seed=7")
    b = _datamodule(compose_cfg, "seed=1", "data.batch_seed=7")
    np.testing.assert_array_equal(_train_order(a), _train_order(b))
    np.testing.assert_array_equal(_train_order(a, epoch=3), _train_order(b, epoch=3))
    assert not np.array_equal(_train_order(a, epoch=0), _train_order(a, epoch=1))  # reshuffled per epoch


def test_stratify_key_reaches_the_split_through_the_config(compose_cfg, pbmc):
    fractions = ["data.val_fraction=0.2", "data.test_fraction=0.2"]
    dm = _datamodule(compose_cfg, "data.stratify_key=bulk_labels", *fractions)
    labels = pbmc.obs["bulk_labels"].to_numpy()
    expected = split_cells(len(labels), val_fraction=0.2, test_fraction=0.2, seed=0, stratify=labels)
    unstratified = split_cells(len(labels), val_fraction=0.2, test_fraction=0.2, seed=0)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(dm.splits[name], expected[name], err_msg=name)
    assert not np.array_equal(dm.splits["val"], unstratified["val"])
    # Stratified: each label's share of the validation cells is its overall share, to within one cell.
    overall = pbmc.obs["bulk_labels"].value_counts()
    val = pbmc.obs["bulk_labels"].iloc[dm.splits["val"]].value_counts().reindex(overall.index, fill_value=0)
    assert (val - overall * len(dm.splits["val"]) / len(labels)).abs().max() <= 1.0


def test_seed_null_draws_a_fresh_batch_order(compose_cfg):
    """``seed=null`` means unseeded: each run draws its own batch order (the split stays on split_seed)."""
    a, b = _datamodule(compose_cfg, "seed=null"), _datamodule(compose_cfg, "seed=null")
    np.testing.assert_array_equal(a.splits["val"], b.splits["val"])
    assert a.batch_seed != b.batch_seed
