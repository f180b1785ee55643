"""The LightningDataModule: AnnData in, preprocessed and split, dict batches out.

The datamodule orders the steps and answers Lightning's hooks; each step lives in its own module: where the
cells come from (:mod:`~exprae.data.source`), reading and input checks (:mod:`~exprae.data.anndata_io`), the
split (:mod:`~exprae.data.split`), covariates (:mod:`~exprae.data.covariates`), preprocessing fitted on training
cells (:mod:`~exprae.data.preprocessing`), the targets, MCV's held-out molecules and the truth
(:mod:`~exprae.data.targets`), streaming from disk (:mod:`~exprae.data.backed`), each split's prepared cells
and the module's hand-off (:mod:`~exprae.data.split_cells`), the choice of loader
(:mod:`~exprae.data.loaders`) and the run records (:mod:`~exprae.data.records`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from exprae.data.anndata_io import (
    _all_zero,
    check_input,
    matrix_name,
    select_matrix,
    warn_empty_cells,
    warn_silent_genes,
)
from exprae.data.backed import BackedCells, BufferedBatchLoader, check_backed_settings, fit_checked, open_backed
from exprae.data.batching import CellDataset
from exprae.data.covariates import Covariates, batch_keys, encode
from exprae.data.device import DeviceBatches
from exprae.data.loaders import SplitLoaders
from exprae.data.mcv import MoleculeSplit
from exprae.data.preprocessing import Preprocessing
from exprae.data.records import data_contract, split_table
from exprae.data.source import DataSource
from exprae.data.split import MIN_HELD_OUT, split_obs
from exprae.data.split_cells import SplitCells
from exprae.data.targets import (
    LIBRARY_OBS,
    MCV_LAYERS,
    SCORED_LAYERS,
    SIZE_FACTOR_OBS,
    TARGET_LAYER,
    attach_layers,
)
from exprae.data.training_data import TrainingData

# Re-exported: where they were defined before the datamodule was split into its steps.
__all__ = [
    "LIBRARY_OBS",
    "MCV_LAYERS",
    "MIN_HELD_OUT",
    "SCORED_LAYERS",
    "SIZE_FACTOR_OBS",
    "TARGET_LAYER",
    "ExpressionDataModule",
]


class ExpressionDataModule(pl.LightningDataModule):
    """Loads an ``.h5ad`` (or a built-in dataset), preprocesses, splits by cells, and serves dict batches.

    The preprocessing's learned state (genes kept, scaling statistics) is fitted on the training cells
    only. ``training_data()`` is everything the LightningModule reads from the data, as one object.
    ``contract()`` and ``split_table()`` describe the data for the run directory, so the model can later be
    applied to new data exactly as it was trained. ``in_memory`` takes an AnnData from Python (a notebook, a
    benchmark) in place of ``path``/``dataset``; it is read as is and never written.
    """

    def __init__(
        self,
        *,
        dataset: str | None = "pbmc68k",
        path: str | None = None,
        layer: str | None = None,
        target_layer: str | None = None,
        count_target: bool = False,
        preprocess: Preprocessing | dict | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        batch_seed: int | None = 0,
        stratify_key: str | None = None,
        label_key: str | None = None,
        batch_key: str | list[str] | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        synthetic: dict[str, Any] | None = None,
        on_device: str | bool = "auto",
        backed: bool = False,
        chunk_size: int = 1024,
        buffer_chunks: int = 8,
        mcv: MoleculeSplit | dict | None = None,
        in_memory: ad.AnnData | None = None,
    ) -> None:
        super().__init__()
        self.origin = DataSource(dataset=dataset, path=path, in_memory=in_memory, synthetic=dict(synthetic or {}))
        self.origin.check(backed=backed)
        self.dataset, self.path, self.layer = dataset, path, layer
        self.in_memory = in_memory
        # target_layer: the matrix the loss is fitted to (X, raw or a layer); None: the input itself.
        # count_target (set from the loss by exprae.train.build): the target is raw counts, not preprocessed.
        self.target_layer, self.count_target = target_layer, bool(count_target)
        if isinstance(preprocess, dict) or preprocess is None:
            preprocess = Preprocessing(**(preprocess or {}))
        self.preprocess = preprocess
        # data.mcv: train on x' ~ Binomial(x, p) of every cell, score validation/test cells against x'' = x - x'.
        self.mcv = mcv if isinstance(mcv, MoleculeSplit) else MoleculeSplit(**(mcv or {}))
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        # Two seeds on purpose: split_seed picks the held-out cells (fixed across a seed sweep, so every run is
        # scored on the same cells); batch_seed orders the training batches (the config sets it to `seed`, so a
        # seed sweep varies initialisation *and* batches). None draws a fresh order per run (seed=null).
        if batch_seed is None:
            batch_seed = int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0] >> 1)
        self.batch_seed = int(batch_seed)
        self.stratify_key, self.label_key = stratify_key, label_key
        # Categorical covariates (exprae.data.covariates): encoded once on all cells at setup.
        self.batch_keys = batch_keys(batch_key)
        self.covariates: Covariates | None = None
        self.recorded_levels: dict[str, list[str]] | None = None  # a resumed run's levels (its data contract)
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.synthetic = self.origin.synthetic
        # data.backed: the matrix stays on disk and is streamed (exprae.data.backed); obs is still in memory.
        self.backed, self.chunk_size, self.buffer_chunks = backed, chunk_size, buffer_chunks
        # Which loader serves a split (host, device-resident: data.on_device, or streamed), and the uploads.
        self.loaders = SplitLoaders(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            batch_seed=self.batch_seed,
            on_device=on_device,
            chunk_size=chunk_size,
            buffer_chunks=buffer_chunks,
        )
        self.on_device = self.loaders.on_device
        self.backed_cells: BackedCells | None = None
        self.adata: ad.AnnData | None = None  # preprocessed, all cells
        self.splits: dict[str, np.ndarray] = {}
        self.label_categories: list[str] | None = None
        self.cells: SplitCells | None = None  # each split's cells as the model reads them, made at setup

    # -- loading

    @property
    def source(self) -> str:
        """Where the data came from, as messages and the run's contract name it."""
        return self.origin.name

    @property
    def layer_name(self) -> str:
        """The input matrix as messages name it: ``X``, ``raw`` or the layer."""
        return matrix_name(self.layer)

    def load_raw(self) -> ad.AnnData:
        """The AnnData as the user has it, before matrix selection and preprocessing."""
        return self.origin.load()

    def setup(self, stage: str | None = None) -> None:
        """Read, check, split and preprocess once (later calls return at once); backed data stays on disk."""
        if self.adata is not None:
            return
        if self.backed:
            self._setup_backed()
            return
        full = self.load_raw()
        adata = select_matrix(full, self.layer)
        what = f"{self.source} ({self.layer_name})"
        check_input(adata, nonnegative=self.preprocess.needs_nonnegative, what=what)
        held_out = None
        if self.mcv.enabled:
            # From here on the model's data is x' alone: preprocessing is fitted on it, input and target come from it.
            x_train, held_out = self.mcv.split(
                adata.X, np.arange(adata.n_obs), what=what, obs_names=adata.obs_names, var_names=adata.var_names
            )
            adata = ad.AnnData(X=x_train, obs=adata.obs, var=adata.var)
        warn_empty_cells(adata, what=what)
        silent = adata.var_names[_all_zero(adata.X, axis=0)]
        self._split(adata.obs, what)
        processed = self.preprocess.per_cell(adata)
        self.preprocess.fit(processed[self.splits["train"]])
        warn_silent_genes(silent, self.preprocess, n_genes=adata.n_vars, what=what)
        self.adata = self.preprocess.transform(adata)
        attach_layers(
            self.adata,
            full,
            adata,
            held_out=held_out,
            held_out_rows=np.concatenate([self.splits["val"], self.splits["test"]]),
            layer=self.layer,
            target_layer=self.target_layer,
            count_target=self.count_target,
            preprocess=self.preprocess,
            mcv=self.mcv,
            source=self.source,
        )
        self._finish_setup()

    def _setup_backed(self) -> None:
        """data.backed=true: obs in memory, matrix on disk; checks and preprocessing fit in one streaming pass."""
        check_backed_settings(
            path=self.path, count_target=self.count_target, target_layer=self.target_layer, on_device=self.on_device
        )
        cells, obs, what = open_backed(
            self.path,
            layer=self.layer,
            preprocess=self.preprocess,
            chunk_size=self.chunk_size,
            mcv=self.mcv,
            source=self.source,
        )
        self._split(obs, what)
        fit_checked(
            cells, self.splits["train"], obs=obs, nonnegative=self.preprocess.needs_nonnegative, what=what, stacklevel=3
        )
        self.backed_cells = cells
        # Annotations only: X stays in the file, so n_obs/var_names/split_table/contract work as in memory.
        self.adata = ad.AnnData(obs=obs, var=pd.DataFrame(index=self.preprocess.genes))
        self._finish_setup()

    def _split(self, obs: pd.DataFrame, what: str) -> None:
        """Split the cells, check the batch settings against the training cells, encode the covariates."""
        self.splits = split_obs(
            obs,
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
            seed=self.split_seed,
            stratify_key=self.stratify_key,
            label_key=self.label_key,
            what=what,
            stacklevel=3,
        )
        self.loaders.check_sizes(n_train=len(self.splits["train"]))
        if self.batch_keys or self.recorded_levels:  # levels fixed here, on all cells, before any training
            self.covariates = encode(obs, self.batch_keys, what=what, levels=self.recorded_levels)

    def _finish_setup(self) -> None:
        """Fix the label categories on all cells, then make the per-split views the rest of exprae reads."""
        label_codes = None
        if self.label_key is not None:
            labels = pd.Categorical(self.adata.obs[self.label_key])
            self.label_categories = [str(c) for c in labels.categories]
            label_codes = labels.codes
        self.cells = SplitCells(
            self.adata,
            self.splits,
            label_codes_n=label_codes,
            batch_codes_nk=None if self.covariates is None else self.covariates.codes_nk,
            backed=self.backed_cells,
            max_chunk=self.loaders.scan_cells,
        )

    # -- what the rest of exprae reads

    @property
    def n_genes(self) -> int:
        """Genes the model reads (after gene selection)."""
        self._require_setup()
        return self.adata.n_vars

    @property
    def var_names(self) -> list[str]:
        """The genes the model reads, in its input order."""
        self._require_setup()
        return list(self.adata.var_names)

    def _require_setup(self) -> None:
        if self.adata is None:
            raise RuntimeError("ExpressionDataModule.setup() has not been called")

    def split_dataset(self, split: str) -> CellDataset:
        """The cells of one split as a :class:`CellDataset`."""
        self._require_setup()
        return self.cells.dataset(split)

    @property
    def n_batches(self) -> list[int]:
        """Levels of each covariate (empty without ``data.batch_key``): the network's covariate input sizes."""
        return [] if self.covariates is None else self.covariates.n_levels

    def split_batch_codes(self, split: str) -> np.ndarray | None:
        """Covariate codes (cells x keys) of one split's cells, in the split's order; None without covariates."""
        self._require_setup()
        return self.cells.batch_codes(split)

    def train_chunks(
        self, chunk_size: int = 4096, *, with_batches: bool = False
    ) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """Dense float32 chunks of the training cells, for fitting baselines and PCA initialisation.

        With ``with_batches`` and covariates each chunk is ``(x_ng, batch_n)``: the cells and their batch codes
        (first covariate).
        """
        self._require_setup()
        return self.cells.train_chunks(chunk_size, with_batches=with_batches)

    def split_chunks(self, split: str, chunk_size: int = 4096) -> Iterator[dict[str, torch.Tensor]]:
        """Dense dict batches of one split's cells in row order, for scoring outside the training loop."""
        self._require_setup()
        return self.cells.chunks(split, chunk_size)

    def train_labels(self) -> torch.Tensor | None:
        """Integer label codes of the training cells, in :meth:`train_chunks` order (-1: no label); None without labels."""
        self._require_setup()
        return self.cells.train_labels()

    # -- loaders

    def loader(
        self, split: str, *, shuffle: bool, resident: bool = False
    ) -> DataLoader | DeviceBatches | BufferedBatchLoader:
        """One split's batches (:mod:`exprae.data.loaders`); ``resident`` lets ``data.on_device`` keep it on the device."""
        self._require_setup()
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if self.backed_cells is not None:
            held_out = self.mcv.enabled and split != "train"
            return self.loaders.streamed(self.cells, split, shuffle=shuffle, world=world, rank=rank, held_out=held_out)
        device = None
        if resident:
            device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        return self.loaders.in_memory(
            self.split_dataset(split), split, shuffle=shuffle, world=world, rank=rank, device=device
        )

    def release_device_data(self) -> None:
        """Drop the splits held on an accelerator (``data.on_device``); the next loader uploads them again."""
        self.loaders.release()

    @property
    def device_nbytes(self) -> int:
        """Bytes of the matrices (input, target, truth) held on an accelerator so far; 0 on the host path."""
        return self.loaders.device_nbytes

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True, resident=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", shuffle=False, resident=True)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", shuffle=False)

    # -- what the module reads

    def training_data(self) -> TrainingData:
        """What the LightningModule needs from this data, as one object (:mod:`exprae.data.training_data`)."""
        self._require_setup()
        return self.cells.training_data(preprocess=self.preprocess, mcv=self.mcv if self.mcv.enabled else None)

    # -- what the run directory records

    def contract(self) -> dict[str, Any]:
        """Plain-data description of the input a trained model expects (genes, matrix, preprocessing)."""
        self._require_setup()
        return data_contract(self)

    def split_table(self) -> pd.DataFrame:
        """One row per cell: its name and which split it is in."""
        self._require_setup()
        return split_table(self.adata.obs_names, self.splits)
