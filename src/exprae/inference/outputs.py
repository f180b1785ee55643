"""Where ``embed`` puts the reconstruction, so an output stays proportionate to its input.

A model trained on 2,000 highly variable genes reconstructs those 2,000, not the 33,000 genes of the file;
a dense cells x all-genes layer filled with NaN outside the model's genes made outputs 27-40x their input
(3 MB -> 82 MB, 8 MB -> 317 MB). The layout, chosen by ``recon``:

* ``"auto"`` (default): ``layers["{key}_recon"]`` when the model reconstructs every gene of the AnnData
  (nothing to pad), otherwise ``obsm["{key}_recon"]``;
* ``"layer"``: always the cells x genes layer, NaN for genes outside the model (as before);
* ``"obsm"``: ``obsm["{key}_recon"]``, cells x the model's genes present in the data, their names in
  ``uns["{key}"]["recon_var_names"]`` (in column order);
* ``"none"``: no reconstruction; the latent, the per-cell and per-gene scores are always written.
"""

from __future__ import annotations

from typing import Literal

import anndata as ad
import numpy as np

from exprae.errors import ConfigError

Recon = Literal["auto", "layer", "obsm", "none"]
RECON_LAYOUTS = ("auto", "layer", "obsm", "none")


def check_recon(recon: str) -> None:
    """Refuse an unknown layout with the valid ones named."""
    if recon not in RECON_LAYOUTS:
        raise ConfigError(f"recon={recon!r} is not one of {list(RECON_LAYOUTS)}")


def write_reconstruction(
    adata: ad.AnnData, recon_nm: np.ndarray, gene_names: list[str], *, key: str, recon: Recon, name: str | None = None
) -> str | None:
    """Store ``recon_nm`` (cells x ``gene_names``, the model's genes found in ``adata``) per ``recon``.

    ``name`` is the layer/obsm key (default ``"{key}_recon"``; a count model's expected counts use the same
    layout under ``"{key}_expected_counts"``). Returns where it went (``"layers"``, ``"obsm"`` or None) for ``uns``.
    """
    name = f"{key}_recon" if name is None else name
    dest = adata.var_names.get_indexer(gene_names)
    covers_all = len(gene_names) == adata.n_vars and (dest >= 0).all()
    layout = ("layer" if covers_all else "obsm") if recon == "auto" else recon
    if layout == "none":
        return None
    if layout == "obsm":
        adata.obsm[name] = recon_nm
        adata.uns.setdefault(key, {})["recon_var_names"] = list(gene_names)
        return "obsm"
    full = np.full((adata.n_obs, adata.n_vars), np.nan, dtype=np.float32)
    full[:, dest] = recon_nm
    adata.layers[name] = full
    return "layers"
