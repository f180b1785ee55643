"""Sweep figures (PNG, Agg backend): final metrics per setting, and validation curves per epoch.

Each setting is drawn as its mean over seeds with ± sd, the individual seeds as dots, and the PCA and
mean-profile baselines on the same cells as references. The y-axis always reaches the mean-profile baseline
(the floor a model must clear), so a difference of 0.004 between settings looks as small as it is next to
the distance from that floor; each panel states the settings' span in the metric's units, and the curves
come with a zoomed inset that says its y range.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from exprae.report.sweep_runs import STAGES, setting_labels

PANELS = (("cosine", "cosine ↑"), ("mse", "MSE ↓"), ("pearson", "Pearson r ↑"))
CURVE_PANELS = (("val/cosine", "cosine", "val cosine ↑"), ("val/mse", "mse", "val MSE ↓"))


def metrics_figure(
    table: pd.DataFrame, summary: pd.DataFrame, keys: Sequence[str], *, path: Path, verdict: Sequence[str] = ()
) -> Path:
    """Val and test cosine / MSE / Pearson per setting: mean ± sd over seeds, seeds as dots, PCA as a bar."""
    fig = metrics_plot(table, summary, keys, verdict=verdict)
    fig.savefig(path, dpi=110)
    return path


def metrics_plot(
    table: pd.DataFrame, summary: pd.DataFrame, keys: Sequence[str], *, verdict: Sequence[str] = ()
) -> Figure:
    """The figure of :func:`metrics_figure`, unsaved; ``verdict`` lines (one per metric) go under the title."""
    settings = list(summary["setting"])
    x = np.arange(len(settings))
    run_setting = dict(zip(table["run"], setting_labels(table, keys), strict=True))
    fig = _figure(figsize=(max(9.0, 1.0 + 0.9 * len(settings) * len(PANELS)), 7.4))
    axes = fig.subplots(len(STAGES), len(PANELS), squeeze=False)
    slanted = len(settings) > 3
    for i, stage in enumerate(STAGES):
        for j, (metric, title) in enumerate(PANELS):
            ax = axes[i, j]
            mean = summary[f"{stage}/model/{metric}/mean"].to_numpy(float)
            sd = np.nan_to_num(summary[f"{stage}/model/{metric}/sd"].to_numpy(float))
            ax.errorbar(x, mean, yerr=sd, fmt="o", color="C0", capsize=4, ms=6, label="exprae, mean ± sd")
            positions = table["run"].map(run_setting).map({s: k for k, s in enumerate(settings)})
            jitter = (table.groupby(positions).cumcount() - 1) * 0.06
            ax.scatter(
                positions + 0.18 + jitter, table[f"{stage}/model/{metric}"], s=12, color="C0", alpha=0.5, label="seeds"
            )
            pca = summary[f"{stage}/pca/{metric}/mean"].to_numpy(float)
            ax.scatter(x, pca, marker="_", s=600, color="0.35", linewidths=2, label="PCA, same cells")
            floor = summary.get(f"{stage}/mean/{metric}/mean")
            if floor is not None and np.isfinite(floor.to_numpy(float)).any():
                ax.scatter(x, floor.to_numpy(float), marker="_", s=600, color="0.7", linewidths=2, label="mean profile")
            span = np.nanmax(mean) - np.nanmin(mean) if np.isfinite(mean).any() else float("nan")
            # The span sits in the title, clear of the points, which may lie anywhere between floor and top.
            ax.set_title(f"{stage} {title}\nsettings span {span:.4f}", fontsize=10)
            ax.set_ylabel(f"{stage} {metric}, mean over cells")
            ax.set_xlim(-0.6, len(settings) - 0.4)  # room around the outer settings, however few
            ax.set_xticks(x, settings, rotation=30 if slanted else 0, ha="right" if slanted else "center")
            ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    top = 1.0 - 0.035 * len(verdict)
    fig.suptitle("Final metrics per setting (held-out cells)", y=0.995)
    for k, line in enumerate(verdict):  # the verdict travels with the figure, not only in summary.md
        fig.text(0.5, 0.96 - 0.03 * k, "Verdict, " + line, ha="center", va="top", fontsize=9, color="0.15")
    fig.tight_layout(rect=(0, 0.04, 1, top - 0.02 if verdict else 0.98))  # the shared legend below the panels
    return fig


def curves_figure(curves: pd.DataFrame, summary: pd.DataFrame, *, path: Path) -> Path:
    """Validation cosine and MSE per epoch: each setting's mean over seeds with a ± sd band."""
    fig = curves_plot(curves, summary)
    fig.savefig(path, dpi=110)
    return path


def curves_plot(curves: pd.DataFrame, summary: pd.DataFrame) -> Figure:
    """The figure of :func:`curves_figure`, unsaved.

    Each panel's y-axis reaches the mean-profile floor, as in :func:`metrics_figure`, so curves that differ
    by 0.001 look as close as they are; an inset, labelled with its y range, shows the same curves zoomed.
    """
    settings = list(summary["setting"])
    colors = matplotlib.colormaps["tab10" if len(settings) <= 10 else "tab20"]
    fig = _figure(figsize=(13, 5.2))
    axes = fig.subplots(1, len(CURVE_PANELS), squeeze=False)
    for ax, (tag, metric, title) in zip(axes[0], CURVE_PANELS, strict=True):
        rows = curves[curves["tag"] == tag]
        pca = summary[f"val/pca/{metric}/mean"].dropna().round(6).unique()
        floor = summary[f"val/mean/{metric}/mean"].dropna() if f"val/mean/{metric}/mean" in summary else pd.Series()
        _draw_curves(ax, rows, settings, colors, pca)
        if not floor.empty:
            ax.axhline(floor.mean(), color="0.7", ls=":", lw=1.5, label="mean profile, same cells")
            lo, hi = ax.dataLim.intervaly
            values = np.concatenate([rows["value"].to_numpy(float), pca])
            zoom = zoom_inset(ax, values, full=(min(lo, floor.min()), max(hi, floor.max())))
            if zoom is not None:
                _draw_curves(zoom, rows, settings, colors, pca)
                zoom.set_title(zoom_title(zoom), fontsize=8)
        ax.set_xlabel("epochs trained (0: the model before training)")
        ax.set_ylabel(title.rsplit(" ", 1)[0])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0, -1].scatter([], [], marker="*", s=90, color="white", edgecolors="black", label="best epoch of a run")
    handles, labels = axes[0, -1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.suptitle("Validation curves per setting (mean ± sd over seeds; ★ each run's best epoch, the model tested)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def _draw_curves(ax: Axes, rows: pd.DataFrame, settings: list[str], colors: Colormap, pca: np.ndarray) -> None:
    """One panel's curves: each setting's mean ± sd over seeds, each run's best epoch, the PCA level."""
    for k, setting in enumerate(settings):
        mine = rows[rows["setting"] == setting]
        if mine.empty:
            continue
        by_epoch = mine.groupby("epoch")["value"]
        mean, sd = by_epoch.mean(), by_epoch.std(ddof=1).fillna(0.0)
        color = colors(k % colors.N)
        ax.plot(mean.index, mean.to_numpy(), color=color, label=setting, lw=1.6, marker=".", ms=4)
        ax.fill_between(mean.index, (mean - sd).to_numpy(), (mean + sd).to_numpy(), color=color, alpha=0.15)
        if "best_epoch" in mine:  # each run's best epoch (the checkpoint that was tested), on its own curve
            best = mine[mine["epoch"] == mine["best_epoch"]]
            ax.scatter(best["epoch"], best["value"], marker="*", s=90, color=color, edgecolors="black", zorder=5)
    for value in pca:
        ax.axhline(value, color="0.35", ls="--", lw=1, label="PCA, same cells" if value == pca[0] else None)


def zoom_inset(ax: Axes, values: np.ndarray, *, full: tuple[float, float]) -> Axes | None:
    """Show ``ax`` over the ``full`` y range and add an inset zoomed onto ``values`` (None if they fill it).

    The inset's caller draws into it and titles it with its y range.
    """
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    lo, hi = values.min(), values.max()
    pad = 0.08 * (hi - lo) or 1e-4
    ax.set_ylim(full[0] - 0.05 * (full[1] - full[0]), full[1] + 0.05 * (full[1] - full[0]))
    if hi - lo > 0.3 * (full[1] - full[0]):
        return None
    # The curves hug the top (a score) or the bottom (a loss) with the floor at the other end: the middle is free.
    zoom = ax.inset_axes((0.1, 0.22, 0.86, 0.5))
    zoom.set_ylim(lo - pad, hi + pad)
    zoom.set_xlim(ax.get_xlim())
    zoom.xaxis.set_major_locator(MaxNLocator(integer=True))
    zoom.tick_params(labelsize=7)
    zoom.grid(alpha=0.3)
    indicator = ax.indicate_inset_zoom(zoom, edgecolor="0.4")
    for line in getattr(indicator, "connectors", None) or indicator[1]:  # lines across the panel only clutter it
        line.set_visible(False)
    return zoom


def zoom_title(zoom: Axes) -> str:
    """What an inset says about its zoom: the y range it shows, in the metric's units."""
    lo, hi = zoom.get_ylim()
    return f"zoom: y from {lo:.4f} to {hi:.4f}"


def _figure(*, figsize: tuple[float, float]) -> Figure:
    """A figure on its own Agg canvas: no pyplot, so no global backend switch and nothing left open."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig
