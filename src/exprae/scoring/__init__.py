"""Scoring held-out cells: per-cell metrics, hidden entries for the imputation score, and figures of both."""

from exprae.scoring.metrics import ReconstructionMetrics, knn_label_accuracy, per_cell_metrics

__all__ = ["ReconstructionMetrics", "knn_label_accuracy", "per_cell_metrics"]
