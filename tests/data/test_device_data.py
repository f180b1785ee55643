"""The device-resident batcher: exact rows, every cell once per epoch, the CPU path's batches for a seed."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from exprae.constants import INDEX_KEY, LABEL_KEY, TARGET_KEY, X_KEY
from exprae.data import CellBatchSampler, CellDataset, ExpressionDataModule, batch_loader
from exprae.data.datasets import synthetic_counts
from exprae.data.device import DeviceBatches, DeviceMatrix, check_on_device, matrix_nbytes, use_device_path
from exprae.train import train


def _sparse_with_empty_rows(n_cells: int, n_genes: int, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    x = sp.random(n_cells, n_genes, density=0.1, random_state=rng, format="csr", dtype=np.float32)
    x = x.tolil()
    for r in (0, 7, n_cells - 1):  # empty rows, including the last (its start is past the stored entries)
        x.rows[r], x.data[r] = [], []
    x[3, :] = rng.random(n_genes)  # one fully dense row sets the padded width
    return x.tocsr()


@pytest.mark.parametrize("n_genes", [50, 40_000])  # int16 and int32 column indices
def test_rows_match_scipy(n_genes):
    x = _sparse_with_empty_rows(40, n_genes)
    m = DeviceMatrix(x, device="cpu")
    assert m.max_row_nnz == n_genes and m.indices.dtype == (torch.int16 if n_genes < 32768 else torch.int32)
    idx = torch.tensor([0, 3, 7, 39, 5, 5, 12])  # repeats and empty rows
    np.testing.assert_array_equal(m.rows(idx).numpy(), x[idx.numpy()].toarray())
    assert m.nbytes == matrix_nbytes(x)


def test_rows_dense_and_all_zero():
    dense = np.random.default_rng(1).normal(size=(10, 6)).astype(np.float32)
    idx = torch.tensor([9, 0, 4])
    np.testing.assert_array_equal(DeviceMatrix(dense, device="cpu").rows(idx).numpy(), dense[[9, 0, 4]])
    zeros = DeviceMatrix(sp.csr_matrix((10, 6), dtype=np.float32), device="cpu")
    assert zeros.rows(idx).shape == (3, 6) and not zeros.rows(idx).any()


def _dataset(n_cells: int = 203) -> CellDataset:
    adata = synthetic_counts(n_cells, 30, store_truth=False, seed=3)
    labels = adata.obs["cell_type"].cat.codes.to_numpy()
    return CellDataset(adata.X, labels=labels)


def test_every_cell_once_per_epoch_and_reshuffled():
    data = _dataset()
    sampler = CellBatchSampler(len(data), 32, shuffle=True, seed=5)
    batches = DeviceBatches.from_dataset(data, sampler=sampler, device="cpu")
    assert len(batches) == 7
    orders = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen = torch.cat([b[INDEX_KEY] for b in batches]).numpy()
        assert sorted(seen.tolist()) == list(range(len(data)))
        orders.append(seen)
    assert not np.array_equal(orders[0], orders[1])


def test_seed_decides_the_order():
    data = _dataset()

    def order(seed: int) -> np.ndarray:
        sampler = CellBatchSampler(len(data), 32, shuffle=True, seed=seed)
        return torch.cat([b[INDEX_KEY] for b in DeviceBatches.from_dataset(data, sampler=sampler, device="cpu")])

    assert torch.equal(order(1), order(1))
    assert not torch.equal(order(1), order(2))


@pytest.mark.parametrize("shuffle", [True, False])
def test_same_batches_as_the_cpu_loader(shuffle):
    data = _dataset()
    sampler = CellBatchSampler(len(data), 32, shuffle=shuffle, seed=11)
    sampler.set_epoch(3)
    cpu = list(batch_loader(data, sampler))
    dev = list(DeviceBatches.from_dataset(data, sampler=sampler, device="cpu"))
    assert len(cpu) == len(dev) == len(sampler)
    for a, b in zip(cpu, dev, strict=True):
        assert set(a) == set(b)
        for key in (X_KEY, TARGET_KEY, INDEX_KEY, LABEL_KEY):
            assert torch.equal(a[key], b[key]), key


def test_ddp_shards_are_disjoint_and_cover_the_cells():
    data = _dataset()
    seen = []
    for rank in range(2):
        sampler = CellBatchSampler(len(data), 16, shuffle=True, seed=0, num_replicas=2, rank=rank)
        seen.append(torch.cat([b[INDEX_KEY] for b in DeviceBatches.from_dataset(data, sampler=sampler, device="cpu")]))
    assert len(seen[0]) == len(seen[1])
    assert set(torch.cat(seen).tolist()) == set(range(len(data)))


def test_on_device_setting():
    assert check_on_device("auto") == "auto" and check_on_device(True) is True
    with pytest.raises(ValueError, match=r"data\.on_device"):
        check_on_device("yes")
    cpu = torch.device("cpu")
    assert use_device_path("auto", device=cpu, nbytes=1) is False  # auto means CUDA only
    assert use_device_path(True, device=cpu, nbytes=1) is True


def test_datamodule_switch():
    dm = ExpressionDataModule(dataset="pbmc68k", batch_size=64, on_device=True)
    dm.setup("fit")
    train_loader, val_loader = dm.train_dataloader(), dm.val_dataloader()
    assert isinstance(train_loader, DeviceBatches) and isinstance(val_loader, DeviceBatches)
    assert dm.train_dataloader() is train_loader  # uploaded once, reused
    assert not isinstance(dm.test_dataloader(), DeviceBatches)
    dm_auto = ExpressionDataModule(dataset="pbmc68k", batch_size=64)
    dm_auto.setup("fit")
    assert not isinstance(dm_auto.train_dataloader(), DeviceBatches)  # auto on a CPU-only machine


@pytest.mark.slow
def test_training_on_device_matches_host_loader(compose_cfg):
    """Same seed, same batches: the resident path trains to the same weights as the host DataLoader."""
    results = []
    for on_device in ("true", "false"):
        cfg = compose_cfg(
            "data=synthetic",
            "data.synthetic.n_cells=300",
            "data.synthetic.n_genes=60",
            "data.batch_size=32",
            f"data.on_device={on_device}",
            "model.dropout=0",
            "trainer.max_epochs=2",
            "callbacks=none",
            "logger=none",
        )
        results.append(train(cfg))
    for stage in ("val", "test"):
        assert results[0][stage]["model"]["cosine"] == pytest.approx(results[1][stage]["model"]["cosine"], abs=1e-6)
