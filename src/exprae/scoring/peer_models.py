"""Posterior-predictive draws of a trained scvi-tools model, for scoring it with exprae's own metric code.

scvi-tools is an optional peer (the ``bench`` extra); nothing here imports it. ``SCVI.posterior_predictive_sample``
converts each minibatch of draws to a ``sparse.GCXS`` array (numba kernels, JIT-compiled on first use) that the
scripts putting scVI beside exprae would densify again at once; on pbmc4k that round trip held a (cells x genes x
draws) array twice over. Drawing through the model's own ``module.sample``, which that method calls per minibatch
before the conversion, gives the same draws under the same torch seed (tests/test_mcv_scripts.py) and maps
each minibatch into the scored space as it comes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anndata as ad
import torch


@torch.inference_mode()
def posterior_predictive_mean(
    model: Any,
    adata: ad.AnnData,
    transform: Callable[[torch.Tensor, slice], torch.Tensor],
    *,
    n_samples: int = 25,
    batch_size: int = 128,
) -> torch.Tensor:
    """``E[transform(c)]`` over a scvi-tools model's posterior-predictive count draws ``c`` of each cell.

    ``transform(counts_bg, rows)`` maps one minibatch of drawn counts (cells x genes) to the space the model is
    scored in (e.g. exprae's input representation at each cell's own depth); ``rows`` are the positions of
    those cells in ``adata``. Each cell's ``n_samples`` draws (latent and counts, as
    ``posterior_predictive_sample`` draws them) are transformed one by one and averaged, so a non-linear
    transform such as log1p is applied to counts, never to a mean. Returns a (cells x genes) float32 tensor.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    loader = model._make_data_loader(adata=model._validate_anndata(adata), batch_size=batch_size, shuffle=False)
    out, start = [], 0
    for tensors in loader:
        draws = model.module.sample(tensors, n_samples=n_samples)  # (cells, genes) or (cells, genes, draws)
        draws = draws if draws.ndim == 3 else draws.unsqueeze(-1)
        rows = slice(start, start + draws.shape[0])
        out.append(torch.stack([transform(draws[..., s].float(), rows) for s in range(draws.shape[-1])]).mean(0))
        start = rows.stop
    if start != adata.n_obs:
        raise RuntimeError(f"scvi-tools' data loader served {start} of {adata.n_obs} cells")
    return torch.cat(out)
