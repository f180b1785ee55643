"""Built-in datasets: the real pbmc68k_reduced that scanpy ships, and seeded synthetic counts with truth."""

from __future__ import annotations

from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from exprae.constants import RATE_KEY, TRUE_LATENT_KEY, TRUTH_KEY
from exprae.errors import ConfigError

BUILTIN = ("pbmc68k", "synthetic")


def pbmc68k() -> ad.AnnData:
    """700 PBMCs x 765 genes shipped inside scanpy (no download): scaled ``X``, log-normalised ``raw``."""
    import scanpy as sc

    return sc.datasets.pbmc68k_reduced()


def _proportions(logits_ng: np.ndarray) -> np.ndarray:
    """Each cell's gene proportions: a row softmax of ``logits_ng`` (computed in place, shifted for stability)."""
    logits_ng -= logits_ng.max(axis=1, keepdims=True)
    rho_ng = np.exp(logits_ng)
    rho_ng /= rho_ng.sum(axis=1, keepdims=True)
    return rho_ng


def _gamma_rate(rng: np.random.Generator, mean_ng: np.ndarray, theta_g: np.ndarray) -> np.ndarray:
    """Each entry's Poisson rate under NB(mean, theta): Gamma(shape=theta, scale=mean/theta), mean ``mean_ng``."""
    return rng.gamma(theta_g, mean_ng / theta_g)


def _negative_binomial(rng: np.random.Generator, mean_ng: np.ndarray, theta_g: np.ndarray) -> np.ndarray:
    """Counts drawn from NB(mean, theta), as Poisson(Gamma(shape=theta, scale=mean/theta)), as float32."""
    return rng.poisson(_gamma_rate(rng, mean_ng, theta_g)).astype(np.float32)


def _log_library(
    rng: np.random.Generator,
    n_cells: int,
    *,
    library_mean: float,
    library_spread: float,
    library_state: float,
    state_n: np.ndarray,
) -> np.ndarray:
    """Each cell's library size: log-normal around ``library_mean`` with sd ``library_spread`` of its log, whose
    correlation with ``state_n`` (a cell-state coordinate) is ``library_state``."""
    # One standard normal per cell, as the generator drew before library_state existed: at 0 the same libraries.
    noise_n = rng.normal(0.0, 1.0, size=n_cells)
    sd = state_n.std()
    state_n = (state_n - state_n.mean()) / (sd if sd > 0 else 1.0)  # standardised on this draw's cells
    mix_n = library_state * state_n + np.sqrt(1.0 - library_state**2) * noise_n
    return np.exp(np.log(library_mean) + library_spread * mix_n)


def synthetic_counts(
    n_cells: int = 2000,
    n_genes: int = 1000,
    *,
    n_types: int = 8,
    n_programs: int = 10,
    library_mean: float = 3000.0,
    library_spread: float = 0.5,
    dispersion: float = 5.0,
    dropout: float = 0.0,
    structure: Literal["linear", "nonlinear"] = "linear",
    n_uninformative: int = 0,
    library_state: float = 0.0,
    store_truth: bool = True,
    seed: int = 0,
) -> ad.AnnData:
    """Seeded negative-binomial counts with cell types and library-size variation.

    Each cell has a position in a ``n_programs``-dimensional space (its type's centroid plus noise), stored in
    ``obsm["X_true"]``, mapped to gene proportions through a linear map or a small random MLP (``structure``)
    plus a per-gene baseline, times a log-normal library size (``library_mean`` sets the depth, hence the
    fraction of zeros; ``library_spread`` is the sd of log library size). Counts are NB(mean, dispersion_g)
    drawn as a Gamma–Poisson mixture, with per-gene dispersions around ``dispersion`` (stored in
    ``var["true_dispersion"]``); ``dropout`` zeroes a further fraction of entries at random. The counts are
    ``X`` and also ``layers["counts"]`` (the same matrix). The NB mean before sampling is kept in
    ``layers["true_mean"]``, and each entry's Poisson rate (the gamma draw: the mean times its overdispersion
    noise) in ``layers["true_rate"]``, the truth molecular cross-validation measures (exprae.data.truth); set
    ``store_truth=False`` at atlas scale.

    Two knobs make the data less kind to a model that reads the cell state off the profile:
    ``n_uninformative`` genes (the last ones, ``var["informative"]`` False) have proportions that do not depend
    on the cell at all (their baseline share of every cell's library); ``library_state`` is the correlation of
    log library size with the cell's first program (``obsm["X_true"][:, 0]``, standardised over the cells), as
    real cell types differ in size. Every setting is recorded in ``uns["synthetic"]``. The defaults give the
    same counts for a seed as before these options existed.
    """
    if n_cells < 1 or n_genes < 1 or n_types < 1 or n_programs < 1:
        raise ConfigError(
            f"synthetic data needs positive sizes, got cells={n_cells} genes={n_genes} types={n_types} "
            f"programs={n_programs}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"synthetic dropout must lie in [0, 1), got {dropout}")
    if not 0 <= int(n_uninformative) < n_genes:
        raise ConfigError(
            f"synthetic n_uninformative must lie in [0, n_genes) = [0, {n_genes}): at least one gene has to carry "
            f"the cell state, got {n_uninformative}"
        )
    if not -1.0 <= library_state <= 1.0:
        raise ConfigError(f"synthetic library_state is a correlation and must lie in [-1, 1], got {library_state}")
    if not library_mean > 0 or not library_spread >= 0 or not dispersion > 0:
        raise ConfigError(
            "synthetic library_mean and dispersion must be positive and library_spread non-negative, got "
            f"library_mean={library_mean} library_spread={library_spread} dispersion={dispersion}"
        )
    n_uninformative = int(n_uninformative)
    rng = np.random.default_rng(seed)
    centroids_tp = rng.normal(0.0, 1.5, size=(n_types, n_programs))
    type_n = rng.integers(0, n_types, size=n_cells)
    u_np = centroids_tp[type_n] + rng.normal(0.0, 0.5, size=(n_cells, n_programs))
    if structure == "nonlinear":
        w1 = rng.normal(0.0, 1.0 / np.sqrt(n_programs), size=(n_programs, 64))
        w2 = rng.normal(0.0, 1.0 / np.sqrt(64), size=(64, n_genes)) * 2.0
        logits_ng = np.tanh(u_np @ w1) @ w2
    elif structure == "linear":
        logits_ng = u_np @ rng.normal(0.0, 0.6 / np.sqrt(n_programs) * 2, size=(n_programs, n_genes))
    else:
        raise ConfigError(f"structure must be 'linear' or 'nonlinear', got {structure!r}")
    base_g = rng.normal(0.0, 1.0, size=n_genes)  # gene baseline abundance
    logits_ng += base_g
    if n_uninformative:
        # The uninformative genes keep their baseline share of every cell (constant proportions); the informative
        # genes share the rest by the cell's state. A softmax over all genes would not do: the state would reach
        # the uninformative genes through the normaliser.
        informative = n_genes - n_uninformative
        base_share_g = _proportions(base_g[None, :].copy())[0]
        rho_ng = np.empty_like(logits_ng)
        rho_ng[:, :informative] = _proportions(logits_ng[:, :informative]) * base_share_g[:informative].sum()
        rho_ng[:, informative:] = base_share_g[informative:]
    else:
        rho_ng = _proportions(logits_ng)
    library_n = _log_library(
        rng,
        n_cells,
        library_mean=library_mean,
        library_spread=library_spread,
        library_state=float(library_state),
        state_n=u_np[:, 0],
    )
    mean_ng = (rho_ng * library_n[:, None]).astype(np.float32)
    theta_g = dispersion * np.exp(rng.normal(0.0, 0.3, size=n_genes))
    rate_ng = _gamma_rate(rng, mean_ng, theta_g)  # drawn apart from the counts (same draws) to be kept as a truth
    counts_ng = rng.poisson(rate_ng).astype(np.float32)
    if dropout > 0:
        counts_ng[rng.random(counts_ng.shape) < dropout] = 0.0
    adata = ad.AnnData(
        X=sp.csr_matrix(counts_ng),
        obs=pd.DataFrame(
            {"cell_type": pd.Categorical([f"type_{t}" for t in type_n]), "true_library_size": library_n},
            index=[f"cell_{i}" for i in range(n_cells)],
        ),
        var=pd.DataFrame(
            {"true_dispersion": theta_g, "informative": np.arange(n_genes) < n_genes - n_uninformative},
            index=[f"gene_{j}" for j in range(n_genes)],
        ),
    )
    # The raw counts also under the name real data uses, so recipes written for it (data.target_layer=counts) run
    # here unchanged; it is the same matrix object as X, not a copy.
    adata.layers["counts"] = adata.X
    if store_truth:
        adata.layers[TRUTH_KEY] = mean_ng
        adata.layers[RATE_KEY] = rate_ng.astype(np.float32)
    adata.obsm[TRUE_LATENT_KEY] = u_np
    adata.uns["synthetic"] = {
        "generator": "synthetic_counts",
        "n_cells": int(n_cells),
        "n_genes": int(n_genes),
        "n_types": int(n_types),
        "n_programs": int(n_programs),
        "library_mean": float(library_mean),
        "library_spread": float(library_spread),
        "dispersion": float(dispersion),
        "dropout": float(dropout),
        "structure": structure,
        "n_uninformative": n_uninformative,
        "library_state": float(library_state),
        "store_truth": bool(store_truth),
        "seed": int(seed),
    }
    return adata


def load_builtin(name: str, **kwargs) -> ad.AnnData:
    """A built-in dataset by name: ``pbmc68k`` (real, bundled) or ``synthetic`` (kwargs to the generator)."""
    if name == "pbmc68k":
        if kwargs:
            raise ConfigError(f"the pbmc68k dataset takes no options, got {sorted(kwargs)}")
        return pbmc68k()
    if name == "synthetic":
        return synthetic_counts(**kwargs)
    raise ConfigError(f"unknown built-in dataset {name!r}; choose one of {list(BUILTIN)} or set data.path")


def synthetic_counts_sparse(
    n_cells: int,
    n_genes: int = 2000,
    *,
    n_types: int = 8,
    n_programs: int = 10,
    library_mean: float = 400.0,
    library_spread: float = 0.5,
    dispersion: float = 5.0,
    seed: int = 0,
    chunk_cells: int | None = None,
    n_threads: int | None = None,
) -> ad.AnnData:
    """Atlas-scale seeded NB counts straight into CSR: the linear model of :func:`synthetic_counts`, no truth.

    Cells are drawn in chunks, each from its own child of ``seed`` (so the result depends on ``chunk_cells``
    but not on ``n_threads``), in parallel threads (numpy's samplers release the GIL); memory stays near the CSR's own
    (a chunk has ~2^23 entries unless ``chunk_cells`` says otherwise).
    The draws differ from :func:`synthetic_counts` for the same seed. The default ``library_mean`` gives ~10%
    non-zero entries at 2,000 genes.
    """
    from concurrent.futures import ThreadPoolExecutor

    chunk_cells = chunk_cells or max(64, 2**23 // n_genes)
    if n_cells < 1 or n_genes < 1 or n_types < 1 or chunk_cells < 1:
        raise ValueError(f"synthetic data needs positive sizes, got cells={n_cells} genes={n_genes} types={n_types}")
    rng = np.random.default_rng(seed)
    centroids_tp = rng.normal(0.0, 1.5, size=(n_types, n_programs))
    w_pg = rng.normal(0.0, 1.2 / np.sqrt(n_programs), size=(n_programs, n_genes)).astype(np.float32)
    base_g = rng.normal(0.0, 1.0, size=n_genes).astype(np.float32)
    theta_g = (dispersion * np.exp(rng.normal(0.0, 0.3, size=n_genes))).astype(np.float32)
    starts = range(0, n_cells, chunk_cells)
    children = np.random.SeedSequence([seed, 1]).spawn(len(starts))

    def chunk(i: int) -> tuple[sp.csr_matrix, np.ndarray]:
        r = np.random.default_rng(children[i])
        n = min(chunk_cells, n_cells - starts[i])
        type_n = r.integers(0, n_types, size=n)
        u_np = (centroids_tp[type_n] + r.normal(0.0, 0.5, size=(n, n_programs))).astype(np.float32)
        rho_ng = _proportions(u_np @ w_pg + base_g)
        library_n = np.exp(r.normal(np.log(library_mean), library_spread, size=n)).astype(np.float32)
        counts_ng = _negative_binomial(r, rho_ng * library_n[:, None], theta_g)
        return sp.csr_matrix(counts_ng), type_n

    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        parts = list(pool.map(chunk, range(len(starts))))
    type_n = np.concatenate([t for _, t in parts])
    return ad.AnnData(
        X=sp.vstack([m for m, _ in parts], format="csr"),
        obs=pd.DataFrame(
            {"cell_type": pd.Categorical([f"type_{t}" for t in type_n])}, index=[f"cell_{i}" for i in range(n_cells)]
        ),
        var=pd.DataFrame({"true_dispersion": theta_g}, index=[f"gene_{j}" for j in range(n_genes)]),
        uns={"synthetic": {"seed": seed, "structure": "linear", "generator": "synthetic_counts_sparse"}},
    )
