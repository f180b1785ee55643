"""What the LightningModule needs from the data, handed over as one typed object.

The datamodule builds it once it is set up (:meth:`exprae.data.ExpressionDataModule.training_data`) and
``exprae.train.build`` passes it to the module (:meth:`exprae.training.AutoencoderModule.attach_data`), so the
module (and the callbacks that read the module) never reach into the datamodule: the training cells for the PCA
start and the baselines, the fitted preprocessing a count model maps its expected counts through, the training
cells' library sizes, the molecule split, the held-out cells' names, and what the data knows (labels, batch
covariates, a noise-free truth, true per-gene dispersions) that decides which scores are logged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from exprae.data.mcv import MoleculeSplit
from exprae.data.preprocessing import Preprocessing

# Dense float32 training chunks (cells x genes); with_batches=True: (x_ng, batch_n) pairs where there are covariates.
TrainChunks = Callable[..., Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]]


def _no_labels() -> torch.Tensor | None:
    return None


@dataclass(frozen=True)
class TrainingData:
    """The data's hand-off to the module; built by the datamodule after ``setup``, read-only afterwards."""

    n_genes: int
    # A fresh pass over the training cells' preprocessed input per call (streamed from disk for backed data).
    train_chunks: TrainChunks
    preprocess: Preprocessing  # fitted on the training cells
    # Integer label codes of the training cells in train_chunks order (-1: unlabelled); None without labels.
    train_labels: Callable[[], torch.Tensor | None] = _no_labels
    mean_log_library: float | None = None  # count targets: mean log total count of the training cells
    true_dispersion_g: np.ndarray | None = None  # per kept gene, where the data knows it (synthetic counts)
    mcv: MoleculeSplit | None = None  # data.mcv: validation/test cells are also scored against held-out molecules
    has_labels: bool = False  # batches carry LABEL_KEY: kNN label accuracy (and, with covariates, cLISI, silhouettes)
    has_truth: bool = False  # batches carry TRUTH_KEY: every reconstruction is also scored against the truth
    # Which expected truths E[T(x)] validation/test batches carry (exprae.data.truth), by EXTRA_SCORES key.
    expected_truths: tuple[str, ...] = ()
    # obs_names of each split's cells in the order batches index them (INDEX_KEY), for per-cell tables.
    split_obs_names: Mapping[str, np.ndarray] = field(default_factory=dict)
