"""Cells streamed from an ``.h5ad`` on disk (``data.backed=true``), for data larger than host memory.

Only ``obs`` and the gene names are read into memory. The matrix stays in the file and is read as
contiguous row ranges ("chunks", ``chunk_size`` cells) through AnnData's on-disk sparse datasets
(``anndata.io.sparse_dataset``), which read just the slice's ``indptr``, ``indices`` and ``data``; sparse
stays sparse until a batch is densified.

Training order is a two-level shuffle, as in scDataset / cellarium: each epoch the chunks are put in a
seeded random order, the resulting cell sequence is cut into one contiguous piece per DDP rank, each piece
is read a buffer (``buffer_chunks`` chunks' worth of cells) at a time, and the cells of a buffer are
shuffled before being cut into mini-batches. Host memory is bounded by the buffer, not by the file:
roughly ``(1 + 2 * num_workers)`` buffers are alive at once (the one being cut, plus the DataLoader's
prefetch).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from exprae.constants import (
    BATCH_KEY,
    INDEX_KEY,
    LABEL_KEY,
    MCV_COUNTS_KEY,
    MCV_TARGET_KEY,
    SIZE_FACTOR_KEY,
    TARGET_KEY,
    X_KEY,
)
from exprae.data.anndata_io import _all_zero, check_matrix, check_names, matrix_is_none, read_h5ad_header
from exprae.data.mcv import MoleculeSplit
from exprae.data.preprocessing import Preprocessing
from exprae.data.streaming_stats import fit_streaming
from exprae.errors import ConfigError, DataError, MissingKeyError

try:
    from anndata.io import read_elem, sparse_dataset
except ImportError:  # anndata < 0.11 kept them in anndata.experimental
    from anndata.experimental import read_elem, sparse_dataset


def matrix_key(layer: str | None) -> str:
    """Where ``data.layer`` lives inside an ``.h5ad``: ``X``, ``raw/X`` or ``layers/<name>``."""
    if layer in (None, "X"):
        return "X"
    if layer == "raw":
        return "raw/X"
    return f"layers/{layer}"


class BackedMatrix:
    """One matrix of an ``.h5ad`` file, read by contiguous row ranges; the file is opened lazily per process.

    Picklable (the open handle is dropped), so DataLoader workers each open their own read-only handle.
    """

    def __init__(self, path: str | Path, *, layer: str | None) -> None:
        self.path, self.key = str(Path(path).expanduser()), matrix_key(layer)
        self._file: h5py.File | None = None
        self._elem: Any = None
        with h5py.File(self.path, "r") as f:
            if self.key not in f:
                layers = list(f.get("layers", {}).keys())
                if self.key == "X":  # anndata stores no X when it is None: say so, as the in-memory path does
                    raise matrix_is_none("X", layers=layers)
                available = [*(["X"] if "X" in f else []), *(["raw"] if "raw" in f else []), *layers]
                raise MissingKeyError(f"{self.key!r} not found in {self.path}; available matrices: {available}")
            node = f[self.key]
            encoding = node.attrs.get("encoding-type", "array")
            if encoding == "csc_matrix":
                raise DataError(
                    f"{self.path}:{self.key} is stored as CSC, which cannot be read by rows efficiently; rewrite "
                    "it as CSR (adata.X = adata.X.tocsr(); adata.write_h5ad(...)) for data.backed=true"
                )
            self.sparse = encoding == "csr_matrix"
            self.shape = tuple(int(s) for s in (node.attrs["shape"] if self.sparse else node.shape))
            dtype = node["data"].dtype if self.sparse else getattr(node, "dtype", None)
            if dtype is None or dtype.kind not in "biuf":  # the same dtypes the in-memory path reads (as_numeric)
                raise DataError(
                    f"{self.path}:{self.key} holds values of dtype {dtype}, not numbers; expected a float or "
                    "integer matrix"
                )

    def _open(self) -> Any:
        if self._elem is None:
            self._file = h5py.File(self.path, "r")
            node = self._file[self.key]
            self._elem = sparse_dataset(node) if self.sparse else node
        return self._elem

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_elem": None}

    def close(self) -> None:
        """Close this process's handle (it reopens on the next read)."""
        if self._file is not None:
            self._file.close()
        self._file, self._elem = None, None

    def read(self, rows: np.ndarray, *, chunk_size: int) -> sp.csr_matrix | np.ndarray:
        """The given rows (sorted ascending), read one contiguous range per chunk they fall in."""
        elem = self._open()
        rows = np.asarray(rows, dtype=np.int64)
        pieces = []
        for chunk_rows in np.split(rows, np.flatnonzero(np.diff(rows // chunk_size)) + 1):
            if chunk_rows.size == 0:
                continue
            lo, hi = int(chunk_rows[0]), int(chunk_rows[-1]) + 1
            block = elem[lo:hi]
            pieces.append(block[chunk_rows - lo])
        if self.sparse:
            return sp.vstack(pieces, format="csr") if pieces else sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        return np.concatenate(pieces) if pieces else np.zeros((0, self.shape[1]), dtype=np.float32)


def read_obs(path: str | Path) -> pd.DataFrame:
    """``obs`` of an ``.h5ad``, without reading any matrix."""
    with h5py.File(Path(path).expanduser(), "r") as f:
        return read_elem(f["obs"])


def read_var_names(path: str | Path, *, layer: str | None) -> pd.Index:
    """The gene names of the chosen matrix (``raw/var`` for ``layer="raw"``), without reading any matrix."""
    with h5py.File(Path(path).expanduser(), "r") as f:
        var = read_elem(f["raw/var"] if layer == "raw" and "raw" in f else f["var"])
    return pd.Index(var.index.astype(str))


class BackedCells:
    """An ``.h5ad`` matrix that stays on disk, read and preprocessed a block of rows at a time.

    Holds only the gene names and the preprocessing (no ``obs``), so it is cheap to send to DataLoader
    workers however many cells the file has.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        layer: str | None,
        preprocess: Preprocessing,
        chunk_size: int,
        mcv: MoleculeSplit | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ConfigError(f"data.chunk_size must be positive, got {chunk_size}")
        self.matrix = BackedMatrix(path, layer=layer)
        self.var_names = read_var_names(path, layer=layer)
        if self.matrix.shape[1] != len(self.var_names):
            raise DataError(
                f"{path}:{self.matrix.key} has {self.matrix.shape[1]} columns but {len(self.var_names)} gene names"
            )
        self.preprocess, self.chunk_size = preprocess, chunk_size
        # data.mcv: every read is thinned to x' by the cell's file row, so streaming gives the in-memory split.
        self.mcv = mcv if mcv is not None and mcv.enabled else None

    @property
    def n_obs(self) -> int:
        return self.matrix.shape[0]

    def raw(self, rows: np.ndarray) -> sp.csr_matrix | np.ndarray:
        """Rows of the file's matrix as stored (float32), before preprocessing; under MCV their x' half."""
        if self.mcv is not None:
            return self.molecule_split(rows)[0]
        return self.stored(rows)

    def stored(self, rows: np.ndarray) -> sp.csr_matrix | np.ndarray:
        """Rows of the file's matrix exactly as stored (float32)."""
        return self.matrix.read(rows, chunk_size=self.chunk_size).astype(np.float32, copy=False)

    def molecule_split(self, rows: np.ndarray) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """``(x', x'')`` of the given rows, drawn from the cells' file rows and the split's seed."""
        what = f"{self.matrix.path} ({self.matrix.key})"
        return self.mcv.split(self.stored(rows), rows, what=what, obs_names=rows.astype(str), var_names=self.var_names)

    def held_out(self, rows: np.ndarray) -> dict[str, Any]:
        """For scoring under MCV: x'' preprocessed like the input, x'' counts on the kept genes, x' size factors."""
        x_train, x_held = self.molecule_split(rows)
        var = pd.DataFrame(index=self.var_names)
        keep = self.var_names.get_indexer(self.preprocess.genes)
        return {
            MCV_TARGET_KEY: self.preprocess.transform(ad.AnnData(X=x_held, var=var)).X,
            MCV_COUNTS_KEY: x_held[:, keep],
            SIZE_FACTOR_KEY: self.preprocess.size_factor(x_train),
        }

    def per_cell(self, x_ng: sp.csr_matrix | np.ndarray) -> sp.csr_matrix | np.ndarray:
        """The stateless per-cell steps (normalize_total, log1p) on a block of rows, all genes."""
        block = ad.AnnData(X=x_ng, var=pd.DataFrame(index=self.var_names))
        return self.preprocess.per_cell(block).X

    def processed(self, rows: np.ndarray) -> sp.csr_matrix | np.ndarray:
        """Rows after the fitted preprocessing (kept genes, scaling): what the model sees."""
        block = ad.AnnData(X=self.raw(rows), var=pd.DataFrame(index=self.var_names))
        return self.preprocess.transform(block).X

    def blocks(self, rows: np.ndarray, *, block_size: int) -> Iterator[tuple[np.ndarray, Any]]:
        """``(rows, raw matrix)`` for consecutive blocks of ``rows`` (sorted), in file order."""
        for start in range(0, len(rows), block_size):
            part = rows[start : start + block_size]
            yield part, self.raw(part)

    def fit(self, train_rows: np.ndarray, *, check: Any = None) -> Preprocessing:
        """Check every cell and fit the preprocessing on the training cells, in one pass over the file.

        ``check(x_ng, rows)`` is called on every raw block (all cells, not only training ones).
        """
        is_train = np.zeros(self.n_obs, dtype=bool)
        is_train[train_rows] = True

        def train_blocks() -> Iterator[Any]:
            for rows, x in self.blocks(np.arange(self.n_obs), block_size=self.chunk_size):
                if check is not None:
                    check(x, rows)
                keep = is_train[rows]
                if keep.any():
                    yield self.per_cell(x[keep])

        return fit_streaming(self.preprocess, train_blocks(), var_names=self.var_names)

    def dense_chunks(self, rows: np.ndarray, *, chunk_size: int) -> Iterator[torch.Tensor]:
        """Preprocessed cells as dense float32 tensors, ``chunk_size`` at a time, in file order."""
        for start in range(0, len(rows), chunk_size):
            yield torch.from_numpy(_dense(self.processed(rows[start : start + chunk_size])))


def check_backed_settings(*, path: str | None, count_target: bool, target_layer: str | None, on_device: object) -> None:
    """Refuse what streaming from disk cannot do: no file, a separate target, data pinned to the GPU."""
    if path is None:
        raise ConfigError("data.backed=true streams an .h5ad from disk: set data.path (and data.dataset=null)")
    if count_target or target_layer is not None:
        raise ConfigError(
            "data.backed=true streams the input matrix only; count losses and data.target_layer need the "
            "in-memory path (data.backed=false)"
        )
    if on_device is True:
        raise ConfigError("data.on_device=true keeps the data on the GPU; it cannot be combined with data.backed=true")


def open_backed(
    path: str,
    *,
    layer: str | None,
    preprocess: Preprocessing,
    chunk_size: int,
    mcv: MoleculeSplit,
    source: str,
) -> tuple[BackedCells, pd.DataFrame, str]:
    """Open the file's matrix and read its obs; refuse a file whose rows, sizes or names do not fit.

    Returns the cells, their obs and how messages name the matrix.
    """
    read_h5ad_header(path)
    cells = BackedCells(path, layer=layer, preprocess=preprocess, chunk_size=chunk_size, mcv=mcv)
    obs = read_obs(path)
    what = f"{source} ({cells.matrix.key})"
    if len(obs) != cells.n_obs:
        raise DataError(f"{what} has {cells.n_obs} rows but obs describes {len(obs)} cells")
    if cells.n_obs == 0 or len(cells.var_names) == 0:
        raise DataError(f"{what} is empty: {cells.n_obs} cells x {len(cells.var_names)} genes")
    check_names(obs.index, cells.var_names, what=what)
    return cells, obs, what


def fit_checked(
    cells: BackedCells, train_rows: np.ndarray, *, obs: pd.DataFrame, nonnegative: bool, what: str, stacklevel: int = 2
) -> None:
    """One pass over the file: check every cell's values and fit the preprocessing on the training cells.

    Warns (once, with the count) about cells whose profile is all zero, as the in-memory path does.
    """
    n_empty = 0

    def check(x: Any, rows: np.ndarray) -> None:
        nonlocal n_empty
        check_matrix(x, obs_names=obs.index[rows], var_names=cells.var_names, nonnegative=nonnegative, what=what)
        n_empty += int(_all_zero(x, axis=1).sum())

    cells.fit(train_rows, check=check)
    if n_empty:
        warnings.warn(
            f"{what}: {n_empty} cells have all-zero profiles; their cosine is defined as 0", stacklevel=stacklevel + 1
        )


def _dense(x: sp.spmatrix | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.toarray() if sp.issparse(x) else x, dtype=np.float32)


# ---------------------------------------------------------------- epoch plan


class BufferSampler(Sampler[np.ndarray]):
    """Yields one buffer of cells (their sorted file rows) at a time: chunk-shuffled, sharded per DDP rank.

    ``rows`` are the split's file rows. With ``shuffle``, the chunks holding them are put in a seeded
    per-epoch order; the cell sequence that gives is cut into ``num_replicas`` contiguous pieces (disjoint,
    covering every cell). With ``pad`` every rank gets the same number of cells (the sequence wraps around,
    as :class:`exprae.data.CellBatchSampler`), which DDP training needs; without it (validation, test) no
    cell is counted twice and piece sizes differ by at most one.
    """

    def __init__(
        self,
        rows: np.ndarray,
        *,
        chunk_size: int,
        buffer_size: int,
        shuffle: bool,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        pad: bool = True,
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer size must be positive, got {buffer_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.rows = np.asarray(rows, dtype=np.int64)
        self.chunk_size, self.buffer_size, self.shuffle, self.seed = chunk_size, buffer_size, shuffle, seed
        self.num_replicas, self.rank, self.pad, self.epoch = num_replicas, rank, pad, 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at each epoch so the order differs per epoch but not per run."""
        self.epoch = epoch

    @property
    def n_cells(self) -> int:
        """Cells this rank sees per epoch."""
        n, world = len(self.rows), self.num_replicas
        if self.pad:
            return math.ceil(n / world)
        return n // world + (self.rank < n % world)

    def rank_rows(self) -> np.ndarray:
        """This rank's cells for the current epoch, in reading order."""
        order = self.rows
        if self.shuffle:
            chunk_of = order // self.chunk_size
            chunks = np.unique(chunk_of)
            position = np.empty(chunks[-1] + 1 if len(chunks) else 0, dtype=np.int64)
            position[chunks] = np.random.default_rng([self.seed, self.epoch]).permutation(len(chunks))
            order = order[np.argsort(position[chunk_of], kind="stable")]
        n, world = len(order), self.num_replicas
        if self.pad:
            per_rank = math.ceil(n / world)
            if per_rank * world > n:
                order = np.concatenate([order, order[: per_rank * world - n]])
            return order[self.rank * per_rank : (self.rank + 1) * per_rank]
        return np.array_split(order, world)[self.rank]

    def __len__(self) -> int:
        return math.ceil(self.n_cells / self.buffer_size)

    def __iter__(self) -> Iterator[np.ndarray]:
        mine = self.rank_rows()
        for start in range(0, len(mine), self.buffer_size):
            yield np.sort(mine[start : start + self.buffer_size])


# ---------------------------------------------------------------- loading


class BufferDataset(Dataset):
    """Reads and preprocesses one buffer; the key is the buffer's sorted file rows (map-style, so workers help)."""

    def __init__(
        self,
        cells: BackedCells,
        *,
        split_rows: np.ndarray,
        label_codes: np.ndarray | None,
        batch_codes: np.ndarray | None = None,
        held_out: bool = False,
    ) -> None:
        self.cells, self.split_rows, self.label_codes = cells, np.asarray(split_rows), label_codes
        self.batch_codes = batch_codes  # file rows x covariates
        self.held_out = held_out  # add MCV's x'' for scoring (validation/test cells only)

    def __len__(self) -> int:
        return len(self.split_rows)

    def __getitem__(self, rows: np.ndarray) -> dict[str, Any]:
        return {
            "x": self.cells.processed(rows),
            # Position within the split, the same INDEX_KEY meaning as the in-memory path.
            "index": np.searchsorted(self.split_rows, rows),
            "labels": None if self.label_codes is None else self.label_codes[rows],
            "batches": None if self.batch_codes is None else self.batch_codes[rows],
            "scored": self.cells.held_out(rows) if self.held_out else {},
        }


def _as_is(item: Any) -> Any:
    """DataLoader collate that keeps a buffer (with its scipy matrix) as it is."""
    return item


class BufferedBatchLoader:
    """Mini-batches cut from shuffled buffers; a DataLoader reads and preprocesses whole buffers (in workers).

    Lightning treats it as a dataloader: it iterates it, takes ``len()`` as the batch count, and calls
    ``sampler.set_epoch`` each epoch.
    """

    batch_sampler = None  # DataLoader's attribute, read by Lightning; batching happens here, per buffer

    def __init__(
        self,
        dataset: BufferDataset,
        sampler: BufferSampler,
        *,
        batch_size: int,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if sampler.buffer_size % batch_size:
            raise ValueError(f"the buffer ({sampler.buffer_size} cells) must hold whole batches of {batch_size}")
        self.sampler, self.batch_size = sampler, batch_size
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.loader = DataLoader(
            dataset,
            sampler=sampler,
            batch_size=None,
            collate_fn=_as_is,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            # Workers run scanpy's numba/OpenMP kernels (normalize_total, log1p); a forked child of a process
            # that already used GNU OpenMP is killed by libgomp, so workers start fresh.
            multiprocessing_context="spawn" if num_workers > 0 else None,
        )

    def __len__(self) -> int:
        return math.ceil(self.sampler.n_cells / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        s = self.sampler
        for i, buffer in enumerate(self.loader):
            n = buffer["x"].shape[0]
            rng = np.random.default_rng([s.seed, s.epoch, s.rank, i])
            order = rng.permutation(n) if s.shuffle else np.arange(n)
            for start in range(0, n, self.batch_size):
                yield self._batch(buffer, order[start : start + self.batch_size])

    def _batch(self, buffer: dict[str, Any], take: np.ndarray) -> dict[str, torch.Tensor]:
        x = torch.from_numpy(_dense(buffer["x"][take]))
        if self.pin_memory:
            x = x.pin_memory()
        batch = {X_KEY: x, TARGET_KEY: x, INDEX_KEY: torch.from_numpy(buffer["index"][take])}
        if buffer["labels"] is not None:
            batch[LABEL_KEY] = torch.as_tensor(buffer["labels"][take], dtype=torch.long)
        if buffer["batches"] is not None:
            batch[BATCH_KEY] = torch.as_tensor(buffer["batches"][take], dtype=torch.long)
        for key, m in buffer["scored"].items():
            batch[key] = torch.from_numpy(_dense(m[take]) if m.ndim == 2 else np.asarray(m[take]))
        return batch


def buffer_cells(*, chunk_size: int, buffer_chunks: int, batch_size: int) -> int:
    """Cells per buffer: ``buffer_chunks`` chunks' worth, rounded up to whole batches."""
    if buffer_chunks < 1:
        raise ConfigError(f"data.buffer_chunks must be positive, got {buffer_chunks}")
    return math.ceil(chunk_size * buffer_chunks / batch_size) * batch_size
