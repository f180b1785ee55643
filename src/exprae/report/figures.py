"""Sweep figures (PNG, Agg backend): final metrics per setting, and validation curves per epoch.

Each setting is drawn as its mean over seeds with ± sd, the individual seeds as dots, and the PCA and
mean-profile baselines on the same cells as references. The y-axis always reaches the mean-profile baseline
(the floor a model must clear), so a difference of 0.004 between settings looks as small as it is next to
the distance from that floor; each panel states the settings' span in the metric's units.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from exprae.report.sweep_runs import STAGES, setting_labels

PANELS = (("cosine", "cosine ↑"), ("mse", "MSE ↓"), ("pearson", "Pearson r ↑"))
CURVE_PANELS = (("val/cosine", "cosine", "val cosine ↑"), ("val/mse", "mse", "val MSE ↓"))


def metrics_figure(table: pd.DataFrame, summary: pd.DataFrame, keys: Sequence[str], *, path: Path) -> Path:
    """Val and test cosine / MSE / Pearson per setting: mean ± sd over seeds, seeds as dots, PCA as a bar."""
    settings = list(summary["setting"])
    x = np.arange(len(settings))
    run_setting = dict(zip(table["run"], setting_labels(table, keys), strict=True))
    fig = _figure(figsize=(max(9.0, 1.0 + 0.9 * len(settings) * len(PANELS)), 7))
    axes = fig.subplots(len(STAGES), len(PANELS), squeeze=False)
    for i, stage in enumerate(STAGES):
        for j, (metric, title) in enumerate(PANELS):
            ax = axes[i, j]
            mean = summary[f"{stage}/model/{metric}/mean"].to_numpy(float)
            sd = np.nan_to_num(summary[f"{stage}/model/{metric}/sd"].to_numpy(float))
            ax.errorbar(x, mean, yerr=sd, fmt="o", color="C0", capsize=4, ms=6, label="exprae, mean ± sd")
            positions = table["run"].map(run_setting).map({s: k for k, s in enumerate(settings)})
            jitter = (table.groupby(positions).cumcount() - 1) * 0.08
            ax.scatter(positions + 0.2 + jitter, table[f"{stage}/model/{metric}"], s=12, color="C0", alpha=0.5)
            pca = summary[f"{stage}/pca/{metric}/mean"].to_numpy(float)
            ax.scatter(x, pca, marker="_", s=600, color="0.35", linewidths=2, label="PCA, same cells")
            floor = summary.get(f"{stage}/mean/{metric}/mean")
            if floor is not None and np.isfinite(floor.to_numpy(float)).any():
                ax.scatter(x, floor.to_numpy(float), marker="_", s=600, color="0.7", linewidths=2, label="mean profile")
            span = np.nanmax(mean) - np.nanmin(mean) if np.isfinite(mean).any() else float("nan")
            ax.text(
                0.02, 0.03, f"settings span {span:.4f}", transform=ax.transAxes, fontsize=8, color="0.3", va="bottom"
            )
            ax.set_ylabel(f"{stage} {metric}, mean over cells")
            ax.set_title(f"{stage} {title}")
            ax.set_xticks(
                x, settings, rotation=30 if len(settings) > 3 else 0, ha="right" if len(settings) > 3 else "center"
            )
            ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="best")
    fig.suptitle("Final metrics per setting (held-out cells)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def curves_figure(curves: pd.DataFrame, summary: pd.DataFrame, *, path: Path) -> Path:
    """Validation cosine and MSE per epoch: each setting's mean over seeds with a ± sd band."""
    settings = list(summary["setting"])
    colors = matplotlib.colormaps["tab10" if len(settings) <= 10 else "tab20"]
    fig = _figure(figsize=(13, 4.8))
    axes = fig.subplots(1, len(CURVE_PANELS), squeeze=False)
    for ax, (tag, metric, title) in zip(axes[0], CURVE_PANELS, strict=True):
        for k, setting in enumerate(settings):
            rows = curves[(curves["tag"] == tag) & (curves["setting"] == setting)]
            if rows.empty:
                continue
            by_epoch = rows.groupby("epoch")["value"]
            mean, sd = by_epoch.mean(), by_epoch.std(ddof=1).fillna(0.0)
            color = colors(k % colors.N)
            ax.plot(mean.index, mean.to_numpy(), color=color, label=setting, lw=1.6, marker=".", ms=4)
            ax.fill_between(mean.index, (mean - sd).to_numpy(), (mean + sd).to_numpy(), color=color, alpha=0.15)
            if "best_epoch" in rows:  # each run's best epoch (the checkpoint that was tested), on its own curve
                best = rows[rows["epoch"] == rows["best_epoch"]]
                ax.scatter(best["epoch"], best["value"], marker="*", s=90, color=color, edgecolors="black", zorder=5)
        pca = summary[f"val/pca/{metric}/mean"].dropna().round(6).unique()
        for value in pca:
            ax.axhline(value, color="0.35", ls="--", lw=1, label="PCA, same cells" if value == pca[0] else None)
        ax.set_xlabel("epochs trained (0: the model before training)")
        ax.set_ylabel(title.rsplit(" ", 1)[0])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0, -1].scatter([], [], marker="*", s=90, color="white", edgecolors="black", label="best epoch of a run")
    axes[0, -1].legend(fontsize=8, loc="best")
    fig.suptitle("Validation curves per setting (mean ± sd over seeds; ★ each run's best epoch, the model tested)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _figure(*, figsize: tuple[float, float]) -> Figure:
    """A figure on its own Agg canvas: no pyplot, so no global backend switch and nothing left open."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig
