"""Categorical covariates (batch, sample, condition): obs columns encoded once as integer codes per cell.

``data.batch_key`` names one obs column (or a list; the first is *the* batch: per-batch scores, per-batch
baselines and the per-batch centre of the network's linear path use it, the others are further categorical
covariates fed to the network, scVI's ``categorical_covariate_keys``). The levels are fixed once, on all cells
before the split, in the column's own category order (sorted for a plain column), and recorded in the data
contract, so a held-out cell, a reloaded model and ``exprae-predict`` all map a level to the same code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from exprae.errors import ConfigError, DataError, MissingKeyError

_SHOWN = 5  # cells or levels quoted in a message


@dataclass(frozen=True)
class Covariates:
    """The covariate keys, each key's levels (in code order), and every cell's codes (cells x keys)."""

    keys: tuple[str, ...]
    categories: dict[str, list[str]]
    codes_nk: np.ndarray

    @property
    def n_levels(self) -> list[int]:
        """Levels per key, in key order (what the network's one-hot inputs are sized by)."""
        return [len(self.categories[k]) for k in self.keys]


def batch_keys(batch_key: str | Sequence[str] | None) -> tuple[str, ...]:
    """``data.batch_key`` as a tuple of obs column names (empty: no covariates)."""
    if batch_key is None:
        return ()
    keys = (batch_key,) if isinstance(batch_key, str) else tuple(batch_key)
    if not keys or not all(isinstance(k, str) and k for k in keys) or len(set(keys)) != len(keys):
        raise ConfigError(f"data.batch_key must be an obs column name or a list of distinct names, got {batch_key!r}")
    return keys


def _column(obs: pd.DataFrame, key: str, what: str) -> pd.Series:
    if key not in obs:
        raise MissingKeyError(f"data.batch_key: obs column {key!r} not found in {what}; available: {list(obs.columns)}")
    column = obs[key]
    missing = column.isna().to_numpy()
    if missing.any():
        raise DataError(
            f"data.batch_key: obs column {key!r} of {what} has {int(missing.sum())} missing values (NaN), e.g. "
            f"cells {list(obs.index[missing][:_SHOWN])}; give them a level of their own (e.g. 'unknown') or "
            "drop those cells"
        )
    return column


def encode(
    obs: pd.DataFrame, keys: Sequence[str], *, what: str, levels: Mapping[str, Sequence[str]] | None = None
) -> Covariates:
    """Fix each key's levels from all cells and encode every cell; missing columns or NaN are errors.

    ``levels``: the levels a run already recorded (a resumed run). Cells are then coded against them by level
    name, whatever the file's category order; a level not among them is an error listing the known ones.
    """
    if levels is not None:
        if tuple(levels) != tuple(keys):
            raise ConfigError(
                f"{what}: this run was trained with data.batch_key={list(levels)} (its data_contract.json), now "
                f"data.batch_key={list(keys) or None}; resume with the batch keys it was started with"
            )
        known = {key: [str(v) for v in values] for key, values in levels.items()}
        return Covariates(tuple(keys), known, recode(obs, known, what=what, advice=_RESUMED))
    categories, codes = {}, []
    for key in keys:
        column = _column(obs, key, what)
        values = column.astype(str) if not isinstance(column.dtype, pd.CategoricalDtype) else column
        cat = pd.Categorical(values)
        if isinstance(column.dtype, pd.CategoricalDtype):
            cat = cat.remove_unused_categories()
        categories[key] = [str(c) for c in cat.categories]
        codes.append(cat.codes.astype(np.int64))
    codes_nk = np.stack(codes, axis=1) if codes else np.zeros((len(obs), 0), dtype=np.int64)
    return Covariates(tuple(keys), categories, codes_nk)


_RELABEL = "Relabel those cells to a known level (e.g. the reference sample) to embed them"
_RESUMED = (
    "A resumed run keeps the levels it started with (the same code for the same name, whatever the file's "
    "category order): rename the level back, or start a new run on this file"
)


def recode(
    obs: pd.DataFrame, categories: Mapping[str, Sequence[str]], *, what: str, advice: str = _RELABEL
) -> np.ndarray:
    """Codes (cells x keys) of new cells against the levels a model was trained with.

    A level the model has never seen is an error that lists the known ones (then ``advice``): the network has
    no input for it.
    """
    codes = []
    for key, levels in categories.items():
        column = _column(obs, key, what).astype(str)
        code_n = pd.Index([str(level) for level in levels]).get_indexer(column)
        unknown = sorted(set(column[code_n < 0]))
        if unknown:
            raise DataError(
                f"obs column {key!r} of {what} has level(s) {unknown[:_SHOWN]} the model was not trained with; "
                f"known levels: {list(levels)}. {advice}"
            )
        codes.append(code_n.astype(np.int64))
    return np.stack(codes, axis=1) if codes else np.zeros((len(obs), 0), dtype=np.int64)


def level_code(categories: Mapping[str, Sequence[str]], level: str) -> int:
    """The code of ``level`` of the first (batch) covariate; an unknown level lists the known ones."""
    if not categories:
        raise ConfigError("transform_batch needs a model trained with data.batch_key; this one has no covariates")
    key, levels = next(iter(categories.items()))
    levels = [str(v) for v in levels]
    if str(level) not in levels:
        raise ConfigError(f"transform_batch={level!r} is not a level of {key!r}; known levels: {levels}")
    return levels.index(str(level))
