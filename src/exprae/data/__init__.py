"""AnnData in, batches out: reading and checking, splitting, preprocessing, batching, and the datamodule.

``source`` says where the cells come from, ``anndata_io`` reads and checks the input matrix, ``split`` assigns
cells to train/val/test, ``covariates`` encodes batch columns, ``preprocessing`` and ``streaming_stats`` fit
scanpy preprocessing on training cells, ``mcv`` splits each count into two halves of molecules (molecular
cross-validation), ``targets`` attaches what the model is fitted and scored against, ``split_cells`` serves
each split's prepared cells, ``batching`` (in memory), ``device`` (resident on the GPU) and ``backed``
(streamed from disk) make batches and ``loaders`` picks among them, ``datasets`` holds the built-in data,
``records`` describes the data for the run directory, and ``datamodule`` orders the steps for Lightning.
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
