"""AnnData in, batches out: reading and checking, splitting, preprocessing, batching, and the datamodule.

``anndata_io`` reads and checks the input matrix, ``split`` assigns cells to train/val/test, ``preprocessing``
and ``streaming_stats`` fit scanpy preprocessing on training cells, ``batching`` (in memory), ``device`` (resident
on the GPU) and ``backed`` (streamed from disk) serve batches, ``datasets`` holds the built-in data, ``mcv``
splits each count into two halves of molecules (molecular cross-validation), and ``datamodule`` ties them
together for Lightning.
"""

from exprae.data.anndata_io import check_counts, check_matrix, check_names, read_h5ad, select_matrix
from exprae.data.batching import CellBatchSampler, CellDataset, batch_loader
from exprae.data.datamodule import ExpressionDataModule
from exprae.data.mcv import MoleculeSplit
from exprae.data.preprocessing import Preprocessing
from exprae.data.split import split_cells

__all__ = [
    "CellBatchSampler",
    "CellDataset",
    "ExpressionDataModule",
    "MoleculeSplit",
    "Preprocessing",
    "batch_loader",
    "check_counts",
    "check_matrix",
    "check_names",
    "read_h5ad",
    "select_matrix",
    "split_cells",
]
