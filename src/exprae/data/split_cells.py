"""The prepared cells of each split as the model reads them: datasets, dense chunks, label and batch codes.

Built by the datamodule at the end of ``setup`` from the preprocessed AnnData of all cells (with the layers
:mod:`exprae.data.targets` attached) and the split; with ``data.backed`` the matrix is read from the file.
"""

from __future__ import annotations

from collections.abc import Iterator

import anndata as ad
import numpy as np
import torch

from exprae.constants import EXPECTED_TRUTHS, LIBRARY_KEY, TARGET_KEY, TRUTH_KEY, X_KEY
from exprae.data.backed import BackedCells
from exprae.data.batching import CellDataset
from exprae.data.mcv import MoleculeSplit
from exprae.data.preprocessing import Preprocessing
from exprae.data.targets import LIBRARY_OBS, SCORED_LAYERS, SIZE_FACTOR_OBS, TARGET_LAYER
from exprae.data.training_data import TrainingData


class SplitCells:
    """Each split's cells: ``label_codes_n`` and ``batch_codes_nk`` cover all cells (None when absent).

    ``max_chunk`` bounds the chunks of a pass over streamed cells (a shuffle buffer's worth), so fitting the
    baselines stays within the memory training takes.
    """

    def __init__(
        self,
        adata: ad.AnnData,
        splits: dict[str, np.ndarray],
        *,
        label_codes_n: np.ndarray | None,
        batch_codes_nk: np.ndarray | None,
        backed: BackedCells | None = None,
        max_chunk: int | None = None,
    ) -> None:
        self.adata, self.splits, self.backed, self.max_chunk = adata, splits, backed, max_chunk
        self.label_codes_n, self.batch_codes_nk = label_codes_n, batch_codes_nk

    def dataset(self, split: str) -> CellDataset:
        """The cells of one split as a :class:`CellDataset` (in memory only)."""
        rows = self.splits[split]
        sub = self.adata[rows]
        obs = {key: sub.obs[key].to_numpy() for key in (LIBRARY_OBS, SIZE_FACTOR_OBS) if key in sub.obs}
        # x'' and the expected truths of held-out cells are scored against; never served for training cells.
        scored = {} if split == "train" else {k: sub.layers[v] for k, v in SCORED_LAYERS.items() if v in sub.layers}
        return CellDataset(
            sub.X,
            target=sub.layers.get(TARGET_LAYER),
            labels=None if self.label_codes_n is None else self.label_codes_n[rows],
            batches=self.batch_codes(split),
            truth=sub.layers.get(TRUTH_KEY),
            library=obs.get(LIBRARY_OBS),
            size_factor=obs.get(SIZE_FACTOR_OBS),
            scored=scored,
        )

    def batch_codes(self, split: str) -> np.ndarray | None:
        """Covariate codes (cells x keys) of one split's cells, in the split's order; None without covariates."""
        return None if self.batch_codes_nk is None else self.batch_codes_nk[self.splits[split]]

    def train_chunks(
        self, chunk_size: int = 4096, *, with_batches: bool = False
    ) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """Dense float32 chunks of the training cells; with ``with_batches`` and covariates ``(x_ng, batch_n)``."""
        size = chunk_size
        if self.backed is not None:
            size = min(size, self.max_chunk or size)
            chunks = self.backed.dense_chunks(self.splits["train"], chunk_size=size)
        else:
            data = self.dataset("train")
            chunks = (data[np.arange(s, min(s + size, len(data)))][X_KEY] for s in range(0, len(data), size))
        codes = self.batch_codes("train") if with_batches else None
        for i, x_ng in enumerate(chunks):
            yield x_ng if codes is None else (x_ng, torch.from_numpy(codes[i * size : i * size + len(x_ng), 0]))

    def chunks(self, split: str, chunk_size: int = 4096) -> Iterator[dict[str, torch.Tensor]]:
        """Dense dict batches of one split's cells in row order, for scoring outside the training loop."""
        if self.backed is not None:  # streamed data has no separate target: the input is the target
            for x_ng in self.backed.dense_chunks(self.splits[split], chunk_size=chunk_size):
                yield {X_KEY: x_ng, TARGET_KEY: x_ng}
            return
        data = self.dataset(split)
        for start in range(0, len(data), chunk_size):
            yield data[np.arange(start, min(start + chunk_size, len(data)))]

    def train_labels(self) -> torch.Tensor | None:
        """Label codes of the training cells in :meth:`train_chunks` order (-1: no label); None without labels."""
        if self.label_codes_n is None:
            return None
        return torch.as_tensor(self.label_codes_n[self.splits["train"]], dtype=torch.long)

    def training_data(self, *, preprocess: Preprocessing, mcv: MoleculeSplit | None) -> TrainingData:
        """What the LightningModule needs from these cells, as one object (:mod:`exprae.data.training_data`)."""
        mean_log_library = None
        if LIBRARY_OBS in self.adata.obs:  # count targets: computed as the module always did, in float32
            library_n = self.dataset("train").per_cell[LIBRARY_KEY]
            mean_log_library = float(library_n.clamp_min(1.0).log().mean())
        true = self.adata.var.get("true_dispersion")
        obs_names = np.asarray(self.adata.obs_names)
        return TrainingData(
            n_genes=self.adata.n_vars,
            train_chunks=self.train_chunks,
            preprocess=preprocess,
            train_labels=self.train_labels,
            mean_log_library=mean_log_library,
            true_dispersion_g=None if true is None else true.to_numpy(dtype=np.float64),
            mcv=mcv,
            has_labels=self.label_codes_n is not None,
            has_truth=TRUTH_KEY in self.adata.layers,
            expected_truths=tuple(name for name, key in EXPECTED_TRUTHS.items() if key in self.adata.layers),
            split_obs_names={split: obs_names[rows] for split, rows in self.splits.items()},
        )
