"""Where the cells come from: an ``.h5ad`` file, a built-in dataset, or an AnnData a script holds in memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad

from exprae.data.anndata_io import read_h5ad
from exprae.data.datasets import load_builtin
from exprae.errors import ConfigError


@dataclass(frozen=True)
class DataSource:
    """One of ``path`` (a file), ``dataset`` (built in, with ``synthetic`` options) or ``in_memory`` (read as is)."""

    dataset: str | None
    path: str | None
    in_memory: ad.AnnData | None = None
    synthetic: dict[str, Any] = field(default_factory=dict)

    def check(self, *, backed: bool) -> None:
        """Refuse settings that name no data, or two sources at once, with the command that fixes it."""
        dataset, path = self.dataset, self.path
        if self.in_memory is not None and (dataset is not None or path is not None or backed):
            raise ConfigError(
                f"in_memory= is the data itself: pass it with dataset=None, path=None and backed=False (got "
                f"dataset={dataset!r}, path={path!r}, backed={backed!r})"
            )
        if self.in_memory is None and dataset is not None and path is not None:
            raise ConfigError(
                f"data.path={path!r} is set, but the data config is the built-in dataset data.dataset={dataset!r}: "
                f"train on your file with `exprae-train data=h5ad data.path={path}` (raw counts: normalize_total "
                "1e4, log1p, 2,000 highly variable genes), or add data.dataset=null to keep this data config's "
                "preprocessing"
            )
        if self.in_memory is None and dataset is None and path is None:
            raise ConfigError("set data.path to an .h5ad file (exprae-train data=h5ad data.path=my.h5ad)")

    @property
    def name(self) -> str:
        """The source as messages and the run's contract name it: the file, ``builtin:<name>`` or the AnnData."""
        if self.in_memory is not None:
            return f"in-memory AnnData ({self.in_memory.n_obs} cells x {self.in_memory.n_vars} genes)"
        return str(Path(self.path).expanduser()) if self.path is not None else f"builtin:{self.dataset}"

    def load(self) -> ad.AnnData:
        """The AnnData as the user has it, before matrix selection and preprocessing."""
        if self.in_memory is not None:
            return self.in_memory
        if self.path is not None:
            return read_h5ad(self.path)
        return load_builtin(self.dataset, **self.synthetic)
