"""scanpy-style plots of an AnnData written by :func:`exprae.embed`: where the reconstruction fails, and for whom.

Every function takes the embedded ``adata`` first, reads the keys ``embed`` wrote under ``key`` (default
``"exprae"``), draws on ``ax`` (a new figure when None), saves to ``save`` if given, shows the figure when
``show=True`` and returns the matplotlib ``Axes`` (or an array of them) either way.

``cells`` chooses which cells a plot covers, from ``obs["{key}_split"]``: ``"held-out"`` (default: the run's
validation and test cells, the only ones that measure the model), ``"training"``, ``"new"`` or ``"all"``.
Every title says which cells and how many, so a figure never passes training cells off as held-out ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from exprae.inference.splits import HELD_OUT
from exprae.scoring import figures

Cells = Literal["held-out", "training", "new", "all"]
CELL_GROUPS = {"held-out": HELD_OUT, "training": ("train",), "new": ("new",)}
BASELINE_COLUMNS = {"pca": "pca_cosine", "mean": "meanprofile_cosine"}


# ---------------------------------------------------------------- shared helpers


def select_cells(adata: ad.AnnData, *, key: str = "exprae", cells: Cells = "held-out") -> tuple[np.ndarray, str]:
    """A boolean mask of the chosen cells and a label for titles, e.g. ``"140 held-out cells (val+test)"``."""
    if cells == "all":
        return np.ones(adata.n_obs, dtype=bool), f"all {adata.n_obs} cells (training cells included)"
    if cells not in CELL_GROUPS:
        raise ValueError(f"cells={cells!r} is not one of {['all', *CELL_GROUPS]}")
    column = f"{key}_split"
    if column not in adata.obs:
        raise KeyError(f"obs[{column!r}] not found: run exprae.embed(model, adata, key_added={key!r}) first")
    mask = adata.obs[column].astype(str).isin(CELL_GROUPS[cells]).to_numpy()
    if not mask.any():
        counts = adata.obs[column].value_counts().to_dict()
        raise ValueError(f"no {cells} cells in obs[{column!r}] (it holds {counts}); pass cells='all' or another group")
    detail = " (val+test)" if cells == "held-out" else ""
    return mask, f"{int(mask.sum())} {cells} cells{detail}"


def reconstruction(adata: ad.AnnData, *, key: str = "exprae") -> pd.DataFrame:
    """The reconstruction ``embed`` wrote (a layer or ``obsm``), as cells x the model's genes."""
    if f"{key}_recon" in adata.obsm:
        names = list(adata.uns[key]["recon_var_names"])
        return pd.DataFrame(np.asarray(adata.obsm[f"{key}_recon"]), index=adata.obs_names, columns=names)
    if f"{key}_recon" in adata.layers:
        layer = np.asarray(adata.layers[f"{key}_recon"])
        keep = ~np.isnan(layer).all(axis=0)
        return pd.DataFrame(layer[:, keep], index=adata.obs_names, columns=adata.var_names[keep])
    raise KeyError(f"no reconstruction under {key!r}: embed with recon='auto' (not 'none')")


def model_input(adata: ad.AnnData, genes: Sequence[str], *, key: str = "exprae", model: Any = None) -> np.ndarray:
    """The model's input for ``genes`` (the "true" side): ``model.transform(adata)``, or ``adata`` itself when the
    run applied no preprocessing (its input was the matrix as given)."""
    if model is not None:
        x = model.transform(adata)[:, list(genes)].X
        return x.toarray() if hasattr(x, "toarray") else np.asarray(x)  # sparse after e.g. log1p without scaling
    settings = adata.uns.get(key, {})
    steps = {k: v for k, v in settings.get("preprocess", {}).items() if v not in (None, False)}
    steps.pop("n_top_genes", None)  # selecting genes does not change values
    steps.pop("hvg_flavor", None)
    if steps:
        raise ValueError(
            f"the run preprocessed its input ({sorted(steps)}): pass model=exprae.load(run) so the input is "
            "prepared as the model saw it"
        )
    layer = settings.get("layer", "X")
    sub = adata[:, list(genes)]
    x = sub.X if layer == "X" else (adata.raw[:, list(genes)].X if layer == "raw" else sub.layers[layer])
    return x.toarray() if hasattr(x, "toarray") else np.asarray(x)


def _axes(ax: Axes | None, *, figsize: tuple[float, float]) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _finish(ax: Axes | np.ndarray, *, show: bool | None, save: str | Path | None) -> Axes | np.ndarray:
    fig = (ax.flat[0] if isinstance(ax, np.ndarray) else ax).get_figure()
    if save is not None:
        fig.savefig(save, dpi=150, bbox_inches="tight")
    if show:
        import matplotlib.pyplot as plt

        plt.show()
    return ax


# ---------------------------------------------------------------- plots


def cosine_distribution(
    adata: ad.AnnData,
    *,
    key: str = "exprae",
    cells: Cells = "held-out",
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Axes:
    """Per-cell cosine of the model against the PCA and mean-profile baselines (``embed(..., baselines=True)``)."""
    mask, label = select_cells(adata, key=key, cells=cells)
    scores = {"model": adata.obs[f"{key}_cosine"].to_numpy()[mask]}
    for who, column in BASELINE_COLUMNS.items():
        if f"{key}_{column}" in adata.obs:
            scores[who] = adata.obs[f"{key}_{column}"].to_numpy()[mask]
    ax = _axes(ax, figsize=(6, 4))
    figures.cosine_histogram(ax, scores)
    ax.set_title(f"{key}: per-cell cosine, {label}", fontsize="medium")
    return _finish(ax, show=show, save=save)


def cosine_by_group(
    adata: ad.AnnData,
    groupby: str,
    *,
    key: str = "exprae",
    cells: Cells = "held-out",
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Axes:
    """Per-cell cosine per group of ``obs[groupby]`` (box per group, cell counts in the labels, PCA medians as ×)."""
    if groupby not in adata.obs:
        raise KeyError(f"obs[{groupby!r}] not found; available: {list(adata.obs.columns)}")
    mask, label = select_cells(adata, key=key, cells=cells)
    obs = adata.obs.loc[mask]
    groups = obs.groupby(groupby, observed=True)[f"{key}_cosine"]
    order = groups.median().sort_values().index
    ax = _axes(ax, figsize=(max(6.0, 0.6 * len(order) + 2), 4.5))
    data = [groups.get_group(g).to_numpy() for g in order]
    ax.boxplot(data, vert=True, showfliers=True, flierprops={"markersize": 2}, medianprops={"color": "#1f77b4"})
    pca = f"{key}_{BASELINE_COLUMNS['pca']}"
    if pca in obs:
        medians = obs.groupby(groupby, observed=True)[pca].median().reindex(order)
        ax.scatter(np.arange(1, len(order) + 1), medians, marker="x", color=figures.COLORS["pca"], label="PCA median")
        ax.legend(loc="lower right", fontsize="small", frameon=False)
    ax.set_xticks(np.arange(1, len(order) + 1), [f"{g} (n={len(d)})" for g, d in zip(order, data, strict=True)])
    ax.tick_params(axis="x", rotation=45)
    for tick in ax.get_xticklabels():
        tick.set_horizontalalignment("right")
    ax.set_ylabel("per-cell cosine(reconstruction, input)")
    ax.set_title(f"{key}: cosine by {groupby}, {label}", fontsize="medium")
    return _finish(ax, show=show, save=save)


def best_median_worst(
    adata: ad.AnnData,
    *,
    key: str = "exprae",
    cells: Cells = "held-out",
    model: Any = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> np.ndarray:
    """Reconstructed against input value per gene for the best, median and worst cell (three axes)."""
    import matplotlib.pyplot as plt

    mask, label = select_cells(adata, key=key, cells=cells)
    recon = reconstruction(adata, key=key)
    sub = adata[mask]
    true_ng = model_input(sub, recon.columns, key=key, model=model)
    recon_ng = recon.loc[sub.obs_names].to_numpy()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), layout="constrained")
    figures.cell_panels(axes, true_ng, recon_ng, sub.obs[f"{key}_cosine"].to_numpy(), names=list(sub.obs_names))
    fig.suptitle(f"{key}: best, median and worst of {label}", fontsize="medium")
    return _finish(axes, show=show, save=save)


def gene_r_vs_mean(
    adata: ad.AnnData,
    *,
    key: str = "exprae",
    use_raw: bool = False,
    model: Any = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Axes:
    """Per-gene Pearson r (input vs reconstruction, ``var["{key}_gene_r"]``) against the gene's mean expression.

    The mean is of the model's input over the cells the r covers, or of ``adata.raw`` with ``use_raw=True``
    (pbmc68k: log-normalised values before its scaling, which centred every gene at 0).
    """
    r = adata.var[f"{key}_gene_r"]
    genes = r.index[r.notna()]
    covers = adata.uns.get(key, {}).get("gene_r_cells", "the embedded cells")
    not_train = adata.obs[f"{key}_split"].astype(str).to_numpy() != "train"
    rows = not_train if not_train.any() else np.ones(adata.n_obs, dtype=bool)
    if use_raw:
        raw = adata.raw[rows][:, list(genes)].X
        mean_g = np.asarray(raw.mean(axis=0)).ravel()
    else:
        mean_g = model_input(adata[rows], genes, key=key, model=model).mean(axis=0)
    ax = _axes(ax, figsize=(6, 4))
    ax.scatter(mean_g, r.loc[genes], s=6, alpha=0.6, color=figures.COLORS["model"], linewidths=0)
    ax.axhline(
        float(np.median(r.loc[genes])), color="black", lw=0.8, ls="--", label=f"median r {np.median(r.loc[genes]):.3f}"
    )
    ax.set_xlabel(
        "mean of adata.raw over these cells" if use_raw else "mean model input (preprocessed) over these cells"
    )
    ax.set_ylabel("per-gene r(input, reconstruction)")
    ax.legend(loc="lower right", fontsize="small", frameon=False)
    ax.set_title(f"{key}: {len(genes)} genes, r over {covers}", fontsize="medium")
    return _finish(ax, show=show, save=save)


def marker_genes(
    adata: ad.AnnData,
    genes: Sequence[str],
    groupby: str,
    *,
    key: str = "exprae",
    cells: Cells = "held-out",
    model: Any = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> np.ndarray:
    """Mean input and mean reconstruction of marker ``genes`` per group, side by side on one colour scale."""
    import matplotlib.pyplot as plt

    mask, label = select_cells(adata, key=key, cells=cells)
    recon = reconstruction(adata, key=key)
    missing = [g for g in genes if g not in recon.columns]
    if missing:
        raise KeyError(f"genes {missing} are not among the model's reconstructed genes")
    sub = adata[mask]
    groups = sub.obs[groupby].astype(str).to_numpy()
    order = sorted(set(groups))
    true = pd.DataFrame(model_input(sub, genes, key=key, model=model), columns=list(genes)).groupby(groups).mean()
    fake = recon.loc[sub.obs_names, list(genes)].groupby(groups).mean()
    counts = pd.Series(groups).value_counts()
    lim = float(np.nanmax(np.abs([true.to_numpy(), fake.to_numpy()])))
    fig, axes = plt.subplots(1, 2, figsize=(1.0 + 0.5 * len(genes) * 2, 1.5 + 0.35 * len(order)), layout="constrained")
    for ax, (title, table) in zip(axes, (("input", true), ("reconstruction", fake)), strict=True):
        image = ax.imshow(table.loc[order].to_numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xticks(range(len(genes)), list(genes), rotation=90)
        ax.set_yticks(range(len(order)), [f"{g} (n={counts[g]})" for g in order])
        ax.set_title(title, fontsize="medium")
    axes[1].set_yticklabels([])
    fig.colorbar(image, ax=axes, shrink=0.8, label="mean over the group's cells")
    fig.suptitle(f"{key}: marker genes by {groupby}, {label}", fontsize="medium")
    return _finish(axes, show=show, save=save)
