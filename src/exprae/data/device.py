"""Data resident on the training device: the split's matrix is uploaded once, batches are made there.

The CPU path (:func:`exprae.data.batch_loader`) slices a batch of rows out of a host matrix and copies it
to the device every step. Here the matrix lives on the device (CSR when sparse, so a 1M x 2,000 matrix at
10% non-zero takes ~1.2 GB), and a batch is a gather of its rows plus a scatter into a dense block, all on
the device. Every shape is fixed by the batch size, so making a batch never reads a value back to the host
(no sync per step) and can run inside a captured CUDA graph. The order of cells comes from the same
:class:`~exprae.data.CellBatchSampler` as the CPU path, uploaded once per epoch, so both paths train on
identical batches for the same seed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch

from exprae.constants import BATCH_KEY, INDEX_KEY, LABEL_KEY, TARGET_KEY, TRUTH_KEY, X_KEY
from exprae.data.batching import CellBatchSampler, CellDataset

log = logging.getLogger(__name__)

OnDevice = Literal["auto"] | bool
# Share of the device's free memory the resident data may take under on_device=auto; the rest is left for
# the model, its activations and the optimizer.
AUTO_MEMORY_FRACTION = 0.5


def check_on_device(value: object) -> OnDevice:
    """Validate the ``data.on_device`` setting: ``"auto"``, ``True`` or ``False``."""
    if value == "auto" or isinstance(value, bool):
        return value
    raise ValueError(f"data.on_device must be 'auto', true or false, got {value!r}")


def _index_dtype(n_genes: int) -> np.dtype:
    # Column indices are stored as narrow as the gene count allows (int16 halves them for <= 32,767 genes).
    return np.dtype(np.int16) if n_genes <= np.iinfo(np.int16).max else np.dtype(np.int32)


def matrix_nbytes(x: np.ndarray | sp.spmatrix) -> int:
    """Bytes the matrix takes once resident on the device (float32 values, as :class:`DeviceMatrix` stores it)."""
    n_cells, n_genes = x.shape
    if sp.issparse(x):
        return int(x.nnz) * (4 + _index_dtype(n_genes).itemsize) + 2 * 8 * n_cells  # starts + row nnz
    return n_cells * n_genes * 4


class DeviceMatrix:
    """A cells x genes float32 matrix held on one device; :meth:`rows` densifies a batch of rows there.

    Sparse input is kept as CSR (row pointers, narrow column indices, values). A batch of ``b`` rows is
    gathered as a fixed ``b x max_row_nnz`` block: positions past a row's last entry repeat that entry, so
    the scatter into the dense block writes every column at most once with a single value (deterministic,
    no host sync, static shapes).
    """

    def __init__(self, x: np.ndarray | sp.spmatrix, *, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.shape = tuple(int(s) for s in x.shape)
        self.sparse = sp.issparse(x)
        if not self.sparse:
            self.dense_ng = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=self.device)
            return
        csr = sp.csr_matrix(x, dtype=np.float32)
        nnz_n = np.diff(csr.indptr)
        self.max_row_nnz = int(nnz_n.max()) if len(nnz_n) else 0
        self.total_nnz = int(csr.nnz)
        self.start_n = torch.as_tensor(csr.indptr[:-1].astype(np.int64), device=self.device)
        self.nnz_n = torch.as_tensor(nnz_n.astype(np.int64), device=self.device)
        self.indices = torch.as_tensor(csr.indices.astype(_index_dtype(self.shape[1])), device=self.device)
        self.values = torch.as_tensor(csr.data, device=self.device)
        self.offsets_k = torch.arange(self.max_row_nnz, device=self.device)

    @property
    def nbytes(self) -> int:
        """Device bytes held by this matrix."""
        if not self.sparse:
            return self.dense_ng.numel() * 4
        return sum(t.numel() * t.element_size() for t in (self.start_n, self.nnz_n, self.indices, self.values))

    def rows(self, idx_b: torch.Tensor) -> torch.Tensor:
        """Dense float32 rows ``idx_b`` (a device tensor of row indices), shape ``(len(idx_b), n_genes)``."""
        if not self.sparse:
            return self.dense_ng.index_select(0, idx_b)
        n_genes = self.shape[1]
        out_bg = torch.zeros(idx_b.shape[0], n_genes, dtype=torch.float32, device=self.device)
        if self.max_row_nnz == 0:
            return out_bg
        start_b = self.start_n.index_select(0, idx_b)
        nnz_b = self.nnz_n.index_select(0, idx_b)
        last_b = (nnz_b - 1).clamp_min(0)
        # An empty row's start may be one past the last stored entry; clamp, then zero its value below.
        pos_bk = (start_b[:, None] + torch.minimum(self.offsets_k[None, :], last_b[:, None])).clamp_max(
            self.total_nnz - 1
        )
        vals_bk = torch.where((nnz_b > 0)[:, None], self.values[pos_bk], 0.0)
        cols_bk = self.indices[pos_bk].long()
        return out_bg.scatter_(1, cols_bk, vals_bk)


class DeviceBatches:
    """Dict batches made on the device, in the order of a :class:`~exprae.data.CellBatchSampler`.

    An iterable with ``__len__``, which is all Lightning needs from a dataloader; Lightning calls
    ``sampler.set_epoch`` at each epoch as it does for a ``DataLoader``.
    """

    batch_sampler = None  # as a DataLoader with batch_size=None: Lightning inspects it, the sampler batches

    def __init__(
        self,
        x: DeviceMatrix,
        *,
        sampler: CellBatchSampler,
        target: DeviceMatrix | None = None,
        labels_n: torch.Tensor | None = None,
        batches_nk: torch.Tensor | None = None,
        truth: DeviceMatrix | None = None,
    ) -> None:
        if sampler.n_cells != x.shape[0]:
            raise ValueError(f"sampler covers {sampler.n_cells} cells but the matrix has {x.shape[0]}")
        self.x, self.target, self.truth, self.sampler = x, target, truth, sampler
        self.labels_n = None if labels_n is None else labels_n.to(x.device)
        self.batches_nk = None if batches_nk is None else batches_nk.to(x.device)
        self.device = x.device

    @classmethod
    def from_dataset(
        cls, dataset: CellDataset, *, sampler: CellBatchSampler, device: torch.device | str
    ) -> DeviceBatches:
        """Upload a :class:`~exprae.data.CellDataset`'s matrices to ``device`` and batch them there."""
        return cls(
            DeviceMatrix(dataset.x, device=device),
            sampler=sampler,
            target=None if dataset.target is None else DeviceMatrix(dataset.target, device=device),
            labels_n=dataset.labels,
            batches_nk=dataset.batches,
            truth=None if dataset.truth is None else DeviceMatrix(dataset.truth, device=device),
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def batch(self, idx_b: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of rows ``idx_b`` (device indices), keyed like :class:`~exprae.data.CellDataset`'s."""
        x_bg = self.x.rows(idx_b)
        batch = {
            X_KEY: x_bg,
            TARGET_KEY: x_bg if self.target is None else self.target.rows(idx_b),
            INDEX_KEY: idx_b,
        }
        if self.labels_n is not None:
            batch[LABEL_KEY] = self.labels_n.index_select(0, idx_b)
        if self.batches_nk is not None:
            batch[BATCH_KEY] = self.batches_nk.index_select(0, idx_b)
        if self.truth is not None:
            batch[TRUTH_KEY] = self.truth.rows(idx_b)
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        host_batches = list(self.sampler)  # one permutation, sliced: cheap on the host
        if not host_batches:
            return
        sizes = [len(b) for b in host_batches]
        # One upload per epoch; every batch below is a view into it.
        order = torch.as_tensor(np.concatenate(host_batches), dtype=torch.int64).to(self.device, non_blocking=True)
        for idx_b in torch.split(order, sizes):
            yield self.batch(idx_b)


def resident_nbytes(dataset: CellDataset) -> int:
    """Device bytes a :class:`~exprae.data.CellDataset` would take as :class:`DeviceBatches`."""
    total = matrix_nbytes(dataset.x)
    for m in (dataset.target, dataset.truth):
        if m is not None:
            total += matrix_nbytes(m)
    per_cell = 0 if dataset.labels is None else 8
    per_cell += 0 if dataset.batches is None else 8 * dataset.batches.shape[1]
    return total + per_cell * len(dataset)


def fits_on_device(nbytes: int, device: torch.device, *, fraction: float = AUTO_MEMORY_FRACTION) -> bool:
    """Whether ``nbytes`` fit in ``fraction`` of the CUDA device's free memory (False off CUDA)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= fraction * free


def use_device_path(setting: OnDevice, *, device: torch.device, nbytes: int) -> bool:
    """Resolve ``data.on_device``: ``auto`` means on a CUDA device when the data fits, else the host loader."""
    setting = check_on_device(setting)
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return False
    if fits_on_device(nbytes, device):
        return True
    log.info(
        "data.on_device=auto: %.2f GB of data exceed %.0f%% of the free memory on %s; using the host loader",
        nbytes / 1e9,
        100 * AUTO_MEMORY_FRACTION,
        device,
    )
    return False
