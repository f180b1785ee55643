"""Scoring held-out cells: per-cell metrics, hidden entries for the imputation score, held-out molecules (MCV),
and figures."""

from exprae.scoring.mcv import MCVScorer, poisson_nll
from exprae.scoring.metrics import ReconstructionMetrics, knn_label_accuracy, per_cell_metrics

__all__ = ["MCVScorer", "ReconstructionMetrics", "knn_label_accuracy", "per_cell_metrics", "poisson_nll"]
