"""Batches of cells: a seeded, per-epoch reshuffled, DDP-sharded sampler and the dataset that densifies rows."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from exprae.constants import (
    BATCH_KEY,
    INDEX_KEY,
    LABEL_KEY,
    LIBRARY_KEY,
    SIZE_FACTOR_KEY,
    TARGET_KEY,
    TRUTH_KEY,
    X_KEY,
)
from exprae.errors import ConfigError

# ---------------------------------------------------------------- batching


class CellBatchSampler(Sampler[np.ndarray]):
    """Yields arrays of row indices, one per batch: seeded, reshuffled per epoch, sharded per DDP rank.

    Each rank takes a disjoint slice of the epoch's permutation. With ``pad`` (training) every rank gets the
    same number of batches, which DDP needs: the permutation is padded by wrapping around when the cells do
    not divide evenly. Without it (validation, test) no cell is seen twice, so metrics summed over ranks are
    exact, and shard sizes differ by at most one cell.
    """

    def __init__(
        self,
        n_cells: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        pad: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be positive, got {batch_size}")
        self.n_cells, self.batch_size, self.shuffle, self.seed = n_cells, batch_size, shuffle, seed
        self.drop_last, self.num_replicas, self.rank, self.epoch = drop_last, num_replicas, rank, 0
        self.pad = pad
        self.per_rank = math.ceil(n_cells / num_replicas) if pad else len(range(rank, n_cells, num_replicas))

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at each epoch so the shuffle differs per epoch but not per run."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank // self.batch_size if self.drop_last else math.ceil(self.per_rank / self.batch_size)

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_cells)
        else:
            order = np.arange(self.n_cells)
        total = self.per_rank * self.num_replicas if self.pad else self.n_cells
        if total > self.n_cells:
            order = np.concatenate([order, order[: total - self.n_cells]])
        mine = order[self.rank : total : self.num_replicas]
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield mine[start : start + self.batch_size]


class CellDataset(Dataset):
    """Rows of a (sparse or dense) matrix, fetched a whole batch at a time and densified per batch."""

    def __init__(
        self,
        x: np.ndarray | sp.spmatrix,
        *,
        target: np.ndarray | sp.spmatrix | None = None,
        labels: np.ndarray | None = None,
        batches: np.ndarray | None = None,
        truth: np.ndarray | sp.spmatrix | None = None,
        library: np.ndarray | None = None,
        size_factor: np.ndarray | None = None,
        scored: dict[str, np.ndarray | sp.spmatrix] | None = None,
    ) -> None:
        self.x = sp.csr_matrix(x, dtype=np.float32) if sp.issparse(x) else np.asarray(x, dtype=np.float32)
        self.target = (
            None
            if target is None
            else (
                sp.csr_matrix(target, dtype=np.float32) if sp.issparse(target) else np.asarray(target, dtype=np.float32)
            )
        )
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
        # Covariate codes, cells x covariates (exprae.data.covariates).
        self.batches = None if batches is None else torch.as_tensor(np.asarray(batches), dtype=torch.long)
        self.truth = (
            None
            if truth is None
            else (sp.csr_matrix(truth, dtype=np.float32) if sp.issparse(truth) else np.asarray(truth, dtype=np.float32))
        )
        # Matrices only the scores read (MCV's held-out molecules), under their batch keys; densified per batch.
        self.scored = {
            key: sp.csr_matrix(m, dtype=np.float32) if sp.issparse(m) else np.asarray(m, dtype=np.float32)
            for key, m in (scored or {}).items()
        }
        # Per-cell scalars for count likelihoods: the target's total counts and the input's normalisation factor.
        self.per_cell = {
            key: torch.as_tensor(np.asarray(v, dtype=np.float32))
            for key, v in ((LIBRARY_KEY, library), (SIZE_FACTOR_KEY, size_factor))
            if v is not None
        }

    def __len__(self) -> int:
        return self.x.shape[0]

    @staticmethod
    def _dense(m: np.ndarray | sp.csr_matrix, rows: np.ndarray) -> torch.Tensor:
        block = m[rows]
        return torch.from_numpy(block.toarray() if sp.issparse(block) else np.ascontiguousarray(block))

    def __getitem__(self, rows: np.ndarray | Sequence[int]) -> dict[str, torch.Tensor]:
        rows = np.asarray(rows, dtype=np.int64)
        x = self._dense(self.x, rows)
        batch = {
            X_KEY: x,
            TARGET_KEY: x if self.target is None else self._dense(self.target, rows),
            INDEX_KEY: torch.from_numpy(rows),
        }
        if self.labels is not None:
            batch[LABEL_KEY] = self.labels[rows]
        if self.batches is not None:
            batch[BATCH_KEY] = self.batches[rows]
        if self.truth is not None:
            batch[TRUTH_KEY] = self._dense(self.truth, rows)
        for key, v in self.per_cell.items():
            batch[key] = v[rows]
        for key, m in self.scored.items():
            batch[key] = self._dense(m, rows)
        return batch


def batch_loader(
    dataset: CellDataset, sampler: Sampler, *, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader where each sampled item is a whole batch of rows (one sparse slice per batch)."""
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
