"""Does new data look like the data the model was trained on? A check before its scores are believed.

A model trained on scaled pbmc68k, applied to raw counts, still returns a latent code and a cosine (0.31):
nothing fails, the numbers are meaningless. Two checks catch a wrong representation:

* **before preprocessing** (a sample of the matrix): integer counts given to a model that takes its input as
  it is (no ``normalize_total``/``log1p`` in its preprocessing), or small non-integer values (already
  log-transformed) given to a model that log-transforms its input;
* **after preprocessing**, in the model's own space, against the training cells' per-gene mean and variance
  saved in the checkpoint (the mean-profile baseline's statistics): the median over genes of the shift of
  the mean in training standard deviations, and of the log-ratio of standard deviations.

Measured on a model of scaled pbmc68k (shift / spread): its 140 held-out cells 0.06 / 0.11, one cell type
alone 0.17 / 0.20, pbmc4k prepared the same way (log-normalised, scaled) 0.02 / 0.04; but pbmc68k's
log-normalised matrix 0.43 / 0.35, pbmc4k log-normalised 0.34 / 0.50, pbmc4k raw counts 0.36 / 0.56 (and its
integer counts are flagged before preprocessing). Above :data:`WARN` a warning is given.

Each finding is a warning (``embed`` / ``exprae-predict``) and is recorded in ``uns["{key}"]["representation"]``.
``exprae-predict`` refuses data with a finding from the matrix itself or a shift or spread above
:data:`REFUSE`, unless ``check_representation=false``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

WARN = 0.3  # median |shift| (training sds) or median |log sd ratio| above which a warning is given
REFUSE = 1.0  # ... above which exprae-predict refuses the data
RAW_FINDING = "the input holds"  # how findings from the matrix itself begin
SAMPLE_VALUES = 100_000  # stored values looked at for integer-ness and range


def raw_findings(x: Any, preprocess: dict[str, Any]) -> list[str]:
    """Hints from the input matrix itself (a sample of its stored values) against the model's preprocessing."""
    values = x.data if sp.issparse(x) else np.asarray(x).ravel()
    values = np.asarray(values[:SAMPLE_VALUES], dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return []
    integer = bool(np.all(values == np.round(values))) and values.min() >= 0
    transforms = bool(preprocess.get("normalize_total")) or bool(preprocess.get("log1p"))
    findings = []
    if integer and not transforms and values.max() > 20:
        findings.append(
            f"the input holds non-negative integers up to {values.max():.0f} (raw counts?), but the model was trained "
            "on a matrix it used as given (no normalize_total/log1p in its preprocessing)"
        )
    if not integer and preprocess.get("log1p") and values.max() < 20:
        findings.append(
            f"the input holds non-integer values up to {values.max():.3g} (already log-transformed?), but the model "
            "log-transforms its input itself (log1p in its preprocessing)"
        )
    return findings


class GeneMoments:
    """Per-gene count, sum and sum of squares of the model's input, accumulated over row blocks in float64."""

    def __init__(self, n_genes: int, device: torch.device) -> None:
        self.n = 0
        self.sums = torch.zeros(2, n_genes, dtype=torch.float64, device=device)

    def update(self, x_ng: torch.Tensor) -> None:
        x = x_ng.double()
        self.n += x.shape[0]
        self.sums += torch.stack([x.sum(0), (x * x).sum(0)])

    def mean_sd(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.sums[0] / max(self.n, 1)
        var = (self.sums[1] / max(self.n, 1) - mean * mean).clamp_min(0)
        return mean.cpu().numpy(), var.sqrt().cpu().numpy()


@dataclass(frozen=True)
class Comparison:
    """How far new data sits from the training cells, per gene summarised by medians."""

    shift: float  # median over genes of |mean_new − mean_train| / sd_train
    spread: float  # median over genes of |log(sd_new / sd_train)|
    n_genes: int

    @property
    def worst(self) -> float:
        return max(self.shift, self.spread)

    def text(self) -> str:
        return (
            f"per-gene means sit a median {self.shift:.2f} training standard deviations from the training cells' "
            f"and the standard deviations differ by a median factor {math.exp(self.spread):.2f} ({self.n_genes} genes)"
        )


def compare_moments(moments: GeneMoments, train_mean_g: np.ndarray, train_var_g: np.ndarray) -> Comparison | None:
    """Compare new data's per-gene moments with the training cells'; None with under 2 cells or no varying gene."""
    if moments.n < 2:
        return None
    mean, sd = moments.mean_sd()
    train_sd = np.sqrt(np.asarray(train_var_g, dtype=np.float64))
    # Genes that vary in both: a gene constant in either has no scale to compare against.
    ok = (train_sd > 1e-6) & (sd > 1e-6)
    if not ok.any():
        return None
    shift = np.abs(mean[ok] - train_mean_g[ok]) / train_sd[ok]
    spread = np.abs(np.log(sd[ok] / train_sd[ok]))
    return Comparison(float(np.median(shift)), float(np.median(spread)), int(ok.sum()))
