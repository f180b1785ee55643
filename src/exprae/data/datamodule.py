"""The LightningDataModule: AnnData in, preprocessed and split, dict batches out."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader

from exprae.constants import (
    EXPECTED_TRUTHS,
    LIBRARY_KEY,
    MCV_COUNTS_KEY,
    MCV_TARGET_KEY,
    TARGET_KEY,
    TRUTH_KEY,
    X_KEY,
)
from exprae.data.anndata_io import (
    _all_zero,
    _row_sums,
    check_counts,
    check_matrix,
    check_names,
    read_h5ad,
    read_h5ad_header,
    select_matrix,
)
from exprae.data.backed import (
    BackedCells,
    BufferDataset,
    BufferedBatchLoader,
    BufferSampler,
    buffer_cells,
    read_obs,
)
from exprae.data.batching import CellBatchSampler, CellDataset, batch_loader
from exprae.data.covariates import Covariates, batch_keys, encode
from exprae.data.datasets import load_builtin
from exprae.data.device import DeviceBatches, check_on_device, resident_nbytes, use_device_path
from exprae.data.mcv import MoleculeSplit
from exprae.data.preprocessing import Preprocessing
from exprae.data.split import split_cells
from exprae.data.training_data import TrainingData
from exprae.data.truth import expected_truths
from exprae.errors import ConfigError, DataError, MissingKeyError

# Where the datamodule keeps a separate target (gene-subset, per split by slicing) and its per-cell scalars.
TARGET_LAYER = "exprae_target"
LIBRARY_OBS = "exprae_library_size"
SIZE_FACTOR_OBS = "exprae_size_factor"
# data.mcv: the held-out molecules x'' (preprocessed like the input; raw counts on the kept genes), scoring only.
MCV_LAYERS = {MCV_TARGET_KEY: "exprae_mcv_target", MCV_COUNTS_KEY: "exprae_mcv_counts"}
SCORED_LAYERS = {**MCV_LAYERS, **{key: key for key in EXPECTED_TRUTHS.values()}}  # validation/test cells only
MIN_HELD_OUT = 10  # fewer validation or test cells than this gets a warning: their mean metric is mostly noise


# ---------------------------------------------------------------- the datamodule


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
        if in_memory is not None and (dataset is not None or path is not None or backed):
            raise ConfigError(
                f"in_memory= is the data itself: pass it with dataset=None, path=None and backed=False (got "
                f"dataset={dataset!r}, path={path!r}, backed={backed!r})"
            )
        if in_memory is None and dataset is not None and path is not None:
            raise ConfigError(
                f"data.path={path!r} is set, but the data config is the built-in dataset data.dataset={dataset!r}: "
                f"train on your file with `exprae-train data=h5ad data.path={path}` (raw counts: normalize_total "
                "1e4, log1p, 2,000 highly variable genes), or add data.dataset=null to keep this data config's "
                "preprocessing"
            )
        if in_memory is None and dataset is None and path is None:
            raise ConfigError("set data.path to an .h5ad file (exprae-train data=h5ad data.path=my.h5ad)")
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
        self.synthetic = dict(synthetic or {})
        self.on_device = check_on_device(on_device)  # train/val batches made on the device: see device_data
        self._resident: dict[tuple[str, str], Any] = {}  # (split, device) -> DeviceBatches, uploaded once
        # data.backed: the matrix stays on disk and is streamed (exprae.data.backed); obs is still in memory.
        self.backed, self.chunk_size, self.buffer_chunks = backed, chunk_size, buffer_chunks
        self.backed_cells: BackedCells | None = None
        self.adata: ad.AnnData | None = None  # preprocessed, all cells
        self.splits: dict[str, np.ndarray] = {}
        self.label_categories: list[str] | None = None

    # -- loading

    @property
    def source(self) -> str:
        """Where the data came from, as messages and the run's contract name it."""
        if self.in_memory is not None:
            return f"in-memory AnnData ({self.in_memory.n_obs} cells x {self.in_memory.n_vars} genes)"
        return str(Path(self.path).expanduser()) if self.path is not None else f"builtin:{self.dataset}"

    @property
    def layer_name(self) -> str:
        """The input matrix as messages name it: ``X``, ``raw`` or the layer."""
        return "X" if self.layer in (None, "X") else self.layer

    def load_raw(self) -> ad.AnnData:
        """The AnnData as the user has it, before matrix selection and preprocessing."""
        if self.in_memory is not None:
            return self.in_memory
        if self.path is not None:
            return read_h5ad(self.path)
        return load_builtin(self.dataset, **self.synthetic)

    def setup(self, stage: str | None = None) -> None:
        if self.adata is not None:
            return
        if self.backed:
            self._setup_backed()
            return
        full = self.load_raw()
        adata = select_matrix(full, self.layer)
        what = f"{self.source} ({self.layer_name})"
        if adata.n_obs == 0 or adata.n_vars == 0:
            raise DataError(f"{what} is empty: {adata.n_obs} cells x {adata.n_vars} genes")
        check_names(adata.obs_names, adata.var_names, what=what)
        check_matrix(
            adata.X,
            obs_names=adata.obs_names,
            var_names=adata.var_names,
            nonnegative=self.preprocess.needs_nonnegative,
            what=what,
        )
        held_out = None
        if self.mcv.enabled:
            # From here on the model's data is x' alone: preprocessing is fitted on it, input and target come from it.
            x_train, held_out = self.mcv.split(
                adata.X, np.arange(adata.n_obs), what=what, obs_names=adata.obs_names, var_names=adata.var_names
            )
            adata = ad.AnnData(X=x_train, obs=adata.obs, var=adata.var)
        empty = _all_zero(adata.X, axis=1)
        if empty.any():
            warnings.warn(
                f"{what}: {int(empty.sum())} cells have all-zero profiles, e.g. {list(adata.obs_names[empty][:3])}; "
                "their cosine is defined as 0, so the loss and metrics stay finite",
                stacklevel=2,
            )
        silent = adata.var_names[_all_zero(adata.X, axis=0)]
        self._split(adata.obs, what)
        self._encode_covariates(adata.obs, what)
        processed = self.preprocess.per_cell(adata)
        self.preprocess.fit(processed[self.splits["train"]])
        _warn_silent_genes(silent, self.preprocess, n_genes=adata.n_vars, what=what)
        self.adata = self.preprocess.transform(adata)
        for col in full.var.columns.difference(self.adata.var.columns):
            # Gene annotations (e.g. synthetic data's true_dispersion) follow the kept genes.
            self.adata.var[col] = full.var[col].reindex(self.adata.var_names).to_numpy()
        if self.count_target or self.target_layer is not None:
            self._attach_target(full, adata)
        if held_out is not None:
            self._attach_held_out(held_out, adata)
        if TRUTH_KEY in full.layers and self.layer_name == "X":
            # Under MCV the model sees x', whose expectation is p times the truth (it matters without normalisation).
            truth_ng = full.layers[TRUTH_KEY] * (self.mcv.fraction if self.mcv.enabled else 1.0)
            truth = ad.AnnData(X=truth_ng, obs=adata.obs[[]], var=pd.DataFrame(index=adata.var_names))
            self.adata.layers[TRUTH_KEY] = self.preprocess.transform(truth).X
            # E[T(x)] (of x'' under MCV), what the models and the MCV score estimate, on the scored cells.
            held = np.concatenate([self.splits["val"], self.splits["test"]])
            depth = 1.0 - self.mcv.fraction if self.mcv.enabled else 1.0
            self.adata.layers.update(expected_truths(full, self.preprocess, rows=held, depth=depth))
        if self.label_key is not None:
            labels = pd.Categorical(self.adata.obs[self.label_key])
            self.label_categories = [str(c) for c in labels.categories]

    def _split(self, obs: pd.DataFrame, what: str) -> None:
        """Check the obs keys and make the seeded train/val/test split."""
        for key in (self.stratify_key, self.label_key):
            if key is not None and key not in obs:
                raise MissingKeyError(f"obs column {key!r} not found in {what}; available: {list(obs.columns)}")
        if self.label_key is not None and obs[self.label_key].isna().all():
            # Unlabelled cells are left out of the auxiliary loss, so an all-missing column would silently turn
            # it off (and leave the kNN label accuracy undefined).
            raise DataError(
                f"obs column {self.label_key!r} of {what} (aux.label_key) has no labels: all {len(obs)} values are "
                "missing (NaN/None); choose a column with labels, or drop the auxiliary loss (aux=none)"
            )
        if self.stratify_key is not None and obs[self.stratify_key].isna().any():
            n_missing = int(obs[self.stratify_key].isna().sum())
            warnings.warn(
                f"{n_missing} cells of {what} have no {self.stratify_key!r} label (data.stratify_key); they are split "
                "as one more stratum of their own",
                stacklevel=2,
            )
        self.splits = split_cells(
            len(obs),
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
            seed=self.split_seed,
            stratify=None if self.stratify_key is None else obs[self.stratify_key].to_numpy(),
        )
        small = {name: len(self.splits[name]) for name in ("val", "test") if len(self.splits[name]) < MIN_HELD_OUT}
        if small:
            warnings.warn(
                f"{what}: only {', '.join(f'{n} {name}' for name, n in small.items())} cells; metrics averaged over "
                f"fewer than {MIN_HELD_OUT} held-out cells are too noisy to compare runs (use more cells or larger "
                "data.val_fraction / data.test_fraction)",
                stacklevel=2,
            )
        if self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError(
                f"data.batch_size must be >= 1 and data.num_workers >= 0, got {self.batch_size} and {self.num_workers}"
            )
        if self.batch_size > len(self.splits["train"]):
            raise ConfigError(
                f"data.batch_size={self.batch_size} is larger than the {len(self.splits['train'])} training cells"
            )

    def _encode_covariates(self, obs: pd.DataFrame, what: str) -> None:
        """Encode the ``data.batch_key`` columns of all cells (their levels fixed here, before any training)."""
        if self.batch_keys or self.recorded_levels:
            self.covariates = encode(obs, self.batch_keys, what=what, levels=self.recorded_levels)

    def _setup_backed(self) -> None:
        """data.backed=true: obs in memory, matrix on disk; checks and preprocessing fit in one streaming pass."""
        if self.path is None:
            raise ConfigError("data.backed=true streams an .h5ad from disk: set data.path (and data.dataset=null)")
        if self.count_target or self.target_layer is not None:
            raise ConfigError(
                "data.backed=true streams the input matrix only; count losses and data.target_layer need the "
                "in-memory path (data.backed=false)"
            )
        if self.on_device is True:
            raise ConfigError(
                "data.on_device=true keeps the data on the GPU; it cannot be combined with data.backed=true"
            )
        read_h5ad_header(self.path)
        cells = BackedCells(
            self.path, layer=self.layer, preprocess=self.preprocess, chunk_size=self.chunk_size, mcv=self.mcv
        )
        obs = read_obs(self.path)
        what = f"{self.source} ({cells.matrix.key})"
        if len(obs) != cells.n_obs:
            raise DataError(f"{what} has {cells.n_obs} rows but obs describes {len(obs)} cells")
        if cells.n_obs == 0 or len(cells.var_names) == 0:
            raise DataError(f"{what} is empty: {cells.n_obs} cells x {len(cells.var_names)} genes")
        check_names(obs.index, cells.var_names, what=what)
        self._split(obs, what)
        self._encode_covariates(obs, what)
        n_empty = 0

        def check(x: Any, rows: np.ndarray) -> None:
            nonlocal n_empty
            check_matrix(
                x,
                obs_names=obs.index[rows],
                var_names=cells.var_names,
                nonnegative=self.preprocess.needs_nonnegative,
                what=what,
            )
            n_empty += int(_all_zero(x, axis=1).sum())

        cells.fit(self.splits["train"], check=check)
        if n_empty:
            warnings.warn(f"{what}: {n_empty} cells have all-zero profiles; their cosine is defined as 0", stacklevel=2)
        self.backed_cells = cells
        # Annotations only: X stays in the file, so n_obs/var_names/split_table/contract work as in memory.
        self.adata = ad.AnnData(obs=obs, var=pd.DataFrame(index=self.preprocess.genes))
        if self.label_key is not None:
            self.label_categories = [str(c) for c in pd.Categorical(obs[self.label_key]).categories]

    def _attach_target(self, full: ad.AnnData, selected: ad.AnnData) -> None:
        """Keep the target for the kept genes: raw counts (count likelihoods) or preprocessed like the input."""
        name = self.target_layer if self.target_layer is not None else self.layer_name
        source = selected if self.target_layer in (None, self.layer) else select_matrix(full, self.target_layer)
        if self.mcv.enabled and source is not selected:
            self._check_mcv_target(source, full)
            source = selected  # the same raw counts, thinned: the target is x' too
        what = f"data.target_layer={name!r} of {self.source}"
        if self.target_layer is None:
            what = f"the count target {name!r} of {self.source} (data.target_layer unset: the input's own matrix)"
        genes = self.adata.var_names
        missing = genes.difference(source.var_names)
        if len(missing):
            raise MissingKeyError(f"{what} lacks {len(missing)} of the input's genes, e.g. {list(missing[:5])}")
        if not self.count_target:
            check_matrix(
                source.X,
                obs_names=source.obs_names,
                var_names=source.var_names,
                nonnegative=self.preprocess.needs_nonnegative,
                what=what,
            )
            self.adata.layers[TARGET_LAYER] = self.preprocess.transform(source).X
            return
        counts = source[:, genes].X
        check_counts(counts, obs_names=source.obs_names, var_names=genes, what=what)
        self.adata.layers[TARGET_LAYER] = counts
        self.adata.obs[LIBRARY_OBS] = _row_sums(counts).astype(np.float32)
        self.adata.obs[SIZE_FACTOR_OBS] = self.preprocess.size_factor(selected.X)

    def _check_mcv_target(self, target: ad.AnnData, full: ad.AnnData) -> None:
        """Under MCV a separate target layer must hold the input's own counts, else its x'' would not be held out."""
        original = select_matrix(full, self.layer).X
        same = target.shape == original.shape and (target.var_names == full.var_names).all()
        if same:
            diff = sp.csr_matrix(target.X, dtype=np.float64) - sp.csr_matrix(original, dtype=np.float64)
            same = diff.count_nonzero() == 0
        if not same:
            raise ConfigError(
                f"data.mcv splits the molecules of the input {self.layer_name!r} of {self.source}, but "
                f"data.target_layer={self.target_layer!r} is a different matrix whose molecules would not be split; "
                "with data.mcv set the target must be the input's counts (unset data.target_layer)"
            )

    def _attach_held_out(self, held_out: sp.csr_matrix, selected: ad.AnnData) -> None:
        """Keep x'' for scoring: preprocessed like the input (by its own total), and as counts on the kept genes."""
        block = ad.AnnData(X=held_out, obs=selected.obs[[]], var=pd.DataFrame(index=selected.var_names))
        self.adata.layers[MCV_LAYERS[MCV_TARGET_KEY]] = self.preprocess.transform(block).X
        self.adata.layers[MCV_LAYERS[MCV_COUNTS_KEY]] = block[:, self.adata.var_names].X.tocsr()
        if SIZE_FACTOR_OBS not in self.adata.obs:  # the count score maps expression back to x' counts with it
            self.adata.obs[SIZE_FACTOR_OBS] = self.preprocess.size_factor(selected.X)

    # -- what the rest of exprae reads

    @property
    def n_genes(self) -> int:
        self._require_setup()
        return self.adata.n_vars

    @property
    def var_names(self) -> list[str]:
        self._require_setup()
        return list(self.adata.var_names)

    def _require_setup(self) -> None:
        if self.adata is None:
            raise RuntimeError("ExpressionDataModule.setup() has not been called")

    def split_dataset(self, split: str) -> CellDataset:
        """The cells of one split as a :class:`CellDataset`."""
        self._require_setup()
        sub = self.adata[self.splits[split]]
        labels = None
        if self.label_key is not None:
            labels = pd.Categorical(sub.obs[self.label_key], categories=self.label_categories).codes
        obs = {key: sub.obs[key].to_numpy() for key in (LIBRARY_OBS, SIZE_FACTOR_OBS) if key in sub.obs}
        # x'' of held-out cells is scored against; the training cells' x'' is never served.
        scored = {} if split == "train" else {k: sub.layers[v] for k, v in SCORED_LAYERS.items() if v in sub.layers}
        return CellDataset(
            sub.X,
            target=sub.layers.get(TARGET_LAYER),
            labels=labels,
            batches=self.split_batch_codes(split),
            truth=sub.layers.get(TRUTH_KEY),
            library=obs.get(LIBRARY_OBS),
            size_factor=obs.get(SIZE_FACTOR_OBS),
            scored=scored,
        )

    @property
    def n_batches(self) -> list[int]:
        """Levels of each covariate (empty without ``data.batch_key``): the network's covariate input sizes."""
        return [] if self.covariates is None else self.covariates.n_levels

    def split_batch_codes(self, split: str) -> np.ndarray | None:
        """Covariate codes (cells x keys) of one split's cells, in the split's order; None without covariates."""
        return None if self.covariates is None else self.covariates.codes_nk[self.splits[split]]

    def train_chunks(
        self, chunk_size: int = 4096, *, with_batches: bool = False
    ) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """Dense float32 chunks of the training cells, for fitting baselines and PCA initialisation.

        With ``with_batches`` and covariates each chunk is ``(x_ng, batch_n)``: the cells and their batch codes
        (first covariate).
        """
        size = chunk_size
        if self.backed_cells is not None:
            # Streamed data: chunks no larger than a shuffle buffer, so this pass stays within the same memory.
            size = min(size, buffer_cells(chunk_size=self.chunk_size, buffer_chunks=self.buffer_chunks, batch_size=1))
            chunks = self.backed_cells.dense_chunks(self.splits["train"], chunk_size=size)
        else:
            data = self.split_dataset("train")
            chunks = (data[np.arange(s, min(s + size, len(data)))][X_KEY] for s in range(0, len(data), size))
        codes = self.split_batch_codes("train") if with_batches else None
        for i, x_ng in enumerate(chunks):
            yield x_ng if codes is None else (x_ng, torch.from_numpy(codes[i * size : i * size + len(x_ng), 0]))

    def split_chunks(self, split: str, chunk_size: int = 4096) -> Iterator[dict[str, torch.Tensor]]:
        """Dense dict batches of one split's cells in row order, for scoring outside the training loop."""
        self._require_setup()
        if self.backed_cells is not None:  # streamed data has no separate target: the input is the target
            for x_ng in self.backed_cells.dense_chunks(self.splits[split], chunk_size=chunk_size):
                yield {X_KEY: x_ng, TARGET_KEY: x_ng}
            return
        data = self.split_dataset(split)
        for start in range(0, len(data), chunk_size):
            yield data[np.arange(start, min(start + chunk_size, len(data)))]

    def train_labels(self) -> torch.Tensor | None:
        """Integer label codes of the training cells, in :meth:`train_chunks` order (-1: no label); None without labels."""
        self._require_setup()
        if self.label_key is None:
            return None
        codes = pd.Categorical(self.adata.obs[self.label_key], categories=self.label_categories).codes
        return torch.as_tensor(codes[self.splits["train"]], dtype=torch.long)

    def _rank_info(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, split: str, *, shuffle: bool, resident: bool = False) -> DataLoader | BufferedBatchLoader:
        # Every split is sharded across DDP ranks; only training pads shards to equal length (see the sampler).
        world, rank = self._rank_info()
        if self.backed_cells is not None:
            return self._backed_loader(split, shuffle=shuffle, world=world, rank=rank)
        data = self.split_dataset(split)
        sampler = CellBatchSampler(
            len(data),
            self.batch_size,
            shuffle=shuffle,
            seed=self.batch_seed,
            num_replicas=world,
            rank=rank,
            pad=shuffle,
        )
        if resident and not data.scored:  # MCV's held-out layers are served from the host (val/test are small)
            trainer = getattr(self, "trainer", None)
            device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
            if use_device_path(self.on_device, device=device, nbytes=resident_nbytes(data)):
                key = (split, str(device))
                if key not in self._resident:
                    self._resident[key] = DeviceBatches.from_dataset(data, sampler=sampler, device=device)
                self._resident[key].sampler = sampler
                return self._resident[key]
        return batch_loader(data, sampler, num_workers=self.num_workers, pin_memory=self.pin_memory)

    def _backed_loader(self, split: str, *, shuffle: bool, world: int, rank: int) -> BufferedBatchLoader:
        rows = self.splits[split]
        codes = None
        if self.label_key is not None:
            codes = pd.Categorical(self.adata.obs[self.label_key], categories=self.label_categories).codes
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
        batches = None if self.covariates is None else self.covariates.codes_nk
        held_out = self.mcv.enabled and split != "train"
        dataset = BufferDataset(
            self.backed_cells, split_rows=rows, label_codes=codes, batch_codes=batches, held_out=held_out
        )
        return BufferedBatchLoader(
            dataset, sampler, batch_size=self.batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory
        )

    def release_device_data(self) -> None:
        """Drop the splits held on an accelerator (``data.on_device``); the next loader uploads them again."""
        self._resident.clear()

    @property
    def device_nbytes(self) -> int:
        """Bytes of the matrices (input, target, truth) held on an accelerator so far; 0 on the host path."""
        held = (m for b in self._resident.values() for m in (b.x, b.target, b.truth) if m is not None)
        return sum(int(m.nbytes) for m in held)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, resident=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False, resident=True)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    # -- what the module reads

    def training_data(self) -> TrainingData:
        """What the LightningModule needs from this data, as one object (:mod:`exprae.data.training_data`)."""
        self._require_setup()
        mean_log_library = None
        if LIBRARY_OBS in self.adata.obs:  # count targets: computed as the module always did, in float32
            library_n = self.split_dataset("train").per_cell[LIBRARY_KEY]
            mean_log_library = float(library_n.clamp_min(1.0).log().mean())
        true = self.adata.var.get("true_dispersion")
        obs_names = np.asarray(self.adata.obs_names)
        return TrainingData(
            n_genes=self.n_genes,
            train_chunks=self.train_chunks,
            preprocess=self.preprocess,
            train_labels=self.train_labels,
            mean_log_library=mean_log_library,
            true_dispersion_g=None if true is None else true.to_numpy(dtype=np.float64),
            mcv=self.mcv if self.mcv.enabled else None,
            has_labels=self.label_key is not None,
            has_truth=TRUTH_KEY in self.adata.layers,
            expected_truths=tuple(name for name, key in EXPECTED_TRUTHS.items() if key in self.adata.layers),
            split_obs_names={split: obs_names[rows] for split, rows in self.splits.items()},
        )

    # -- what the run directory records

    def contract(self) -> dict[str, Any]:
        """Plain-data description of the input a trained model expects (genes, matrix, preprocessing)."""
        self._require_setup()
        return {
            "source": self.source,
            "layer": self.layer,
            "target_layer": self.target_layer,
            "count_target": self.count_target,
            "n_genes": self.n_genes,
            "var_names": self.var_names,
            "preprocess": self.preprocess.to_dict(),
            "label_key": self.label_key,
            "label_categories": self.label_categories,
            # Covariate levels in code order (exprae.data.covariates): a model's one-hot inputs follow this order.
            "batch_categories": None if self.covariates is None else self.covariates.categories,
            "mcv": self.mcv.to_dict(),
        }

    def split_table(self) -> pd.DataFrame:
        """One row per cell: its name and which split it is in."""
        self._require_setup()
        split = np.empty(self.adata.n_obs, dtype=object)
        for name, idx in self.splits.items():
            split[idx] = name
        return pd.DataFrame({"obs_name": self.adata.obs_names, "split": split})


def _warn_silent_genes(silent: pd.Index, preprocess: Preprocessing, *, n_genes: int, what: str) -> None:
    """Warn about genes zero in every cell that the model keeps, with advice that fits the gene selection.

    Zero genes that highly-variable-gene selection drops cost nothing, so they are not mentioned.
    """
    kept = silent[silent.isin(preprocess.genes)]
    if kept.empty:
        return
    n_top = preprocess.n_top_genes
    if n_top is None:
        advice = "keep highly variable genes with data.preprocess.n_top_genes=2000 (for example) or filter them out"
    else:
        advice = (
            f"data.preprocess.n_top_genes={n_top} keeps them ({n_genes} genes present"
            + (", so all are kept" if n_top >= n_genes else "; more are asked for than vary")
            + "): lower n_top_genes or filter them out"
        )
    warnings.warn(
        f"{what}: {len(kept)} genes are zero in every cell, e.g. {list(kept[:3])}; they carry no signal "
        f"({advice}, e.g. sc.pp.filter_genes(adata, min_cells=1))",
        stacklevel=3,
    )
