"""What a run directory records about its data: the input contract a trained model expects, and the split."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from exprae.data.datamodule import ExpressionDataModule


def data_contract(datamodule: ExpressionDataModule) -> dict[str, Any]:
    """Plain-data description of the input a trained model expects (genes, matrix, preprocessing, levels).

    Written as the run's ``data_contract.json``; ``exprae.load`` and ``exprae-predict`` replay it on new data.
    """
    dm = datamodule
    return {
        "source": dm.source,
        "layer": dm.layer,
        "target_layer": dm.target_layer,
        "count_target": dm.count_target,
        "n_genes": dm.n_genes,
        "var_names": dm.var_names,
        "preprocess": dm.preprocess.to_dict(),
        "label_key": dm.label_key,
        "label_categories": dm.label_categories,
        # Covariate levels in code order (exprae.data.covariates): a model's one-hot inputs follow this order.
        "batch_categories": None if dm.covariates is None else dm.covariates.categories,
        "mcv": dm.mcv.to_dict(),
    }


def split_table(obs_names: pd.Index, splits: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per cell: its name and which split it is in (the run directory's ``split.csv``)."""
    split = np.empty(len(obs_names), dtype=object)
    for name, idx in splits.items():
        split[idx] = name
    return pd.DataFrame({"obs_name": obs_names, "split": split})
