"""Training: the LightningModule, its low-overhead step, callbacks, hyperparameter records and config checks."""

from exprae.training.callbacks import BatchSeed, DivergenceGuard, ReconstructionFigures
from exprae.training.cell_scores import CellScores
from exprae.training.history import History
from exprae.training.module import AutoencoderModule

__all__ = ["AutoencoderModule", "BatchSeed", "CellScores", "DivergenceGuard", "History", "ReconstructionFigures"]
