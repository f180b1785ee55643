"""Figures of per-cell reconstruction quality, shared by the TensorBoard callback and the inspection notebook.

Each function draws on a matplotlib ``Axes`` it is given, so a notebook lays out its own grid and the
callback renders off-screen (``matplotlib.figure.Figure`` + Agg canvas, no pyplot state, no GUI backend).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

# One colour per scorer, the same everywhere: the model stands out, baselines are muted.
COLORS = {"model": "#1f77b4", "pca": "#ff7f0e", "mean": "#7f7f7f"}
LABELS = {"model": "autoencoder", "pca": "PCA baseline", "mean": "mean-profile baseline"}


def cosine_histogram(ax: Axes, cosines: Mapping[str, np.ndarray], *, bins: int = 40) -> Axes:
    """Per-cell cosine distributions (one outline per scorer), medians dashed and quoted in the legend."""
    values = [np.asarray(v, dtype=float) for v in cosines.values()]
    lo = min(-0.05, *(np.nanmin(v) for v in values if v.size))
    edges = np.linspace(lo, 1.0, bins + 1)
    for who, v in cosines.items():
        v = np.asarray(v, dtype=float)
        color = COLORS.get(who)
        med = float(np.nanmedian(v))
        ax.hist(
            v,
            bins=edges,
            histtype="step",
            linewidth=1.8,
            color=color,
            label=f"{LABELS.get(who, who)} (median {med:.3f})",
        )
        ax.axvline(med, color=color, linestyle="--", linewidth=1)
    ax.set_xlabel("per-cell cosine(reconstruction, input)")
    ax.set_ylabel("cells")
    ax.legend(loc="upper right", fontsize="small", frameon=False)
    return ax


def true_vs_recon(ax: Axes, true_g: np.ndarray, recon_g: np.ndarray, *, title: str | None = None) -> Axes:
    """One cell's reconstructed against true value per gene, with the identity line (perfect reconstruction)."""
    true_g, recon_g = np.asarray(true_g, dtype=float), np.asarray(recon_g, dtype=float)
    ax.scatter(true_g, recon_g, s=6, alpha=0.5, color=COLORS["model"], linewidths=0)
    finite = np.isfinite(true_g) & np.isfinite(recon_g)
    lo = min(true_g[finite].min(), recon_g[finite].min())
    hi = max(true_g[finite].max(), recon_g[finite].max())
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, linestyle=":")
    ax.set_xlabel("input (preprocessed)")
    ax.set_ylabel("reconstruction")
    if title:
        ax.set_title(title, fontsize="medium")
    return ax


def pick_cells(cosine_n: np.ndarray) -> dict[str, int]:
    """Row index of the best, median and worst reconstructed cell."""
    order = np.argsort(np.asarray(cosine_n))
    return {"best": int(order[-1]), "median": int(order[len(order) // 2]), "worst": int(order[0])}


def cell_panels(
    axes: Sequence[Axes],
    true_ng: np.ndarray,
    recon_ng: np.ndarray,
    cosine_n: np.ndarray,
    *,
    names: Sequence[str] | None = None,
) -> dict[str, int]:
    """True-vs-reconstruction scatters of the best, median and worst cell on three axes; returns their rows."""
    picks = pick_cells(cosine_n)
    for ax, (which, row) in zip(axes, picks.items(), strict=True):
        label = f" {names[row]}" if names is not None else ""
        true_vs_recon(ax, true_ng[row], recon_ng[row], title=f"{which} cell{label}: cosine {cosine_n[row]:.3f}")
    return picks


def histogram_figure(cosines: Mapping[str, np.ndarray], *, title: str) -> Figure:
    """A stand-alone figure of :func:`cosine_histogram` (off-screen, for TensorBoard)."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    cosine_histogram(fig.add_subplot(), cosines)
    fig.suptitle(title, fontsize="medium")
    return fig


def cells_figure(true_ng: np.ndarray, recon_ng: np.ndarray, cosine_n: np.ndarray, *, title: str) -> Figure:
    """A stand-alone figure of :func:`cell_panels` (off-screen, for TensorBoard)."""
    fig = Figure(figsize=(12, 4), layout="constrained")
    cell_panels(fig.subplots(1, 3), true_ng, recon_ng, cosine_n)
    fig.suptitle(title, fontsize="medium")
    return fig
