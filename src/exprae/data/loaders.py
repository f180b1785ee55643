"""How a split is served: batches sliced from host memory, made on the accelerator, or streamed from disk.

One :class:`SplitLoaders` holds the batch settings (``data.batch_size``, workers, ``data.batch_seed``,
``data.on_device``, the backed path's chunking) and picks the loader for a split: a ``DataLoader`` over a
:class:`~exprae.data.CellDataset` (:mod:`exprae.data.batching`), the same batches made on the device
(:mod:`exprae.data.device`, uploaded once and kept here), or a shuffle buffer over the file
(:mod:`exprae.data.backed`). Every split is sharded across DDP ranks; only training pads its shards to equal
length (see the samplers).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from exprae.data.backed import BufferDataset, BufferedBatchLoader, BufferSampler, buffer_cells
from exprae.data.batching import CellBatchSampler, CellDataset, batch_loader
from exprae.data.device import DeviceBatches, OnDevice, check_on_device, resident_nbytes, use_device_path
from exprae.data.split_cells import SplitCells
from exprae.errors import ConfigError


class SplitLoaders:
    """Makes each split's loader from one set of batch settings; keeps the splits it made resident on a device."""

    def __init__(
        self,
        *,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        batch_seed: int,
        on_device: OnDevice,
        chunk_size: int,
        buffer_chunks: int,
    ) -> None:
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.batch_seed, self.on_device = batch_seed, check_on_device(on_device)
        self.chunk_size, self.buffer_chunks = chunk_size, buffer_chunks
        self.resident: dict[tuple[str, str], DeviceBatches] = {}  # (split, device) -> uploaded once

    def check_sizes(self, *, n_train: int) -> None:
        """Refuse a batch size or worker count the training cells cannot serve."""
        if self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError(
                f"data.batch_size must be >= 1 and data.num_workers >= 0, got {self.batch_size} and {self.num_workers}"
            )
        if self.batch_size > n_train:
            raise ConfigError(f"data.batch_size={self.batch_size} is larger than the {n_train} training cells")

    def in_memory(
        self,
        data: CellDataset,
        split: str,
        *,
        shuffle: bool,
        world: int,
        rank: int,
        device: torch.device | None = None,
    ) -> DataLoader | DeviceBatches:
        """Batches of an in-memory split: made on ``device`` where ``data.on_device`` resolves so, else the host's."""
        sampler = CellBatchSampler(
            len(data),
            self.batch_size,
            shuffle=shuffle,
            seed=self.batch_seed,
            num_replicas=world,
            rank=rank,
            pad=shuffle,
        )
        # MCV's held-out layers are served from the host (val/test are small).
        on_device = device is not None and not data.scored
        if on_device and use_device_path(self.on_device, device=device, nbytes=resident_nbytes(data)):
            key = (split, str(device))
            if key not in self.resident:
                self.resident[key] = DeviceBatches.from_dataset(data, sampler=sampler, device=device)
            self.resident[key].sampler = sampler
            return self.resident[key]
        return batch_loader(data, sampler, num_workers=self.num_workers, pin_memory=self.pin_memory)

    def streamed(
        self,
        cells: SplitCells,
        split: str,
        *,
        shuffle: bool,
        world: int,
        rank: int,
        held_out: bool,
    ) -> BufferedBatchLoader:
        """Batches of one split of streamed cells, read chunk by chunk into a shuffle buffer (``data.backed``).

        ``held_out`` also serves MCV's x'' (validation and test cells).
        """
        rows = cells.splits[split]
        sampler = BufferSampler(
            rows,
            chunk_size=self.chunk_size,
            buffer_size=buffer_cells(
                chunk_size=self.chunk_size, buffer_chunks=self.buffer_chunks, batch_size=self.batch_size
            ),
            shuffle=shuffle,
            seed=self.batch_seed,
            num_replicas=world,
            rank=rank,
            pad=shuffle,
        )
        dataset = BufferDataset(
            cells.backed,
            split_rows=rows,
            label_codes=cells.label_codes_n,
            batch_codes=cells.batch_codes_nk,
            held_out=held_out,
        )
        return BufferedBatchLoader(
            dataset, sampler, batch_size=self.batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory
        )

    @property
    def scan_cells(self) -> int:
        """Most cells a pass over streamed cells reads at once: a shuffle buffer's worth, so memory stays bounded."""
        return buffer_cells(chunk_size=self.chunk_size, buffer_chunks=self.buffer_chunks, batch_size=1)

    def release(self) -> None:
        """Drop the splits held on an accelerator; the next loader uploads them again."""
        self.resident.clear()

    @property
    def device_nbytes(self) -> int:
        """Bytes of the matrices (input, target, truth) held on an accelerator so far; 0 on the host path."""
        held = (m for b in self.resident.values() for m in (b.x, b.target, b.truth) if m is not None)
        return sum(int(m.nbytes) for m in held)
