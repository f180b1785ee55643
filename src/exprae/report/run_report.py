"""``report.html`` of one run: the results table, learning curves with the best epoch, per-cell histogram, worst cells.

Read from the run directory alone (``metrics.json``, ``history.csv``, ``cells.csv``), so it can be rebuilt for
any finished run: ``python -m exprae.report.run_report RUN_DIR``. Every number is on held-out cells; the
histogram and the worst cells are the test cells, the curves the validation cells.
"""

from __future__ import annotations

import html
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from exprae.report import figures as sweep_figures
from exprae.report import html as page_parts
from exprae.runs import rundir
from exprae.scoring import figures

REPORT_FILE = "report.html"
N_WORST = 10
SCORED = (("model", "exprae"), ("pca", "PCA"), ("mean", "mean profile"))
CELL_COLUMNS = {"model": "cosine", "pca": "pca_cosine", "mean": "meanprofile_cosine"}


def results_table(metrics: dict) -> str:
    """Val/test cosine, Pearson and MSE of the model and both baselines (per cell, averaged over cells)."""
    cols = [(stage, m) for stage in ("val", "test") for m in ("cosine", "pearson", "mse")]
    header = ["", *(f"{s} {m}" for s, m in cols)]
    rows, classes = [], []
    for who, label in SCORED:
        values = [metrics.get(s, {}).get(who, {}).get(m) for s, m in cols]
        if all(v is None for v in values):
            continue
        if who == "model":
            label = f"exprae ({metrics.get('loss', 'model')})"
        elif who == "pca":
            label = f"PCA ({metrics.get('latent_dim', '?')} comps)"
        rows.append([label, *("-" if v is None else f"{v:.4f}" for v in values)])
        classes.append("model" if who == "model" else "")
    n = metrics.get("n_cells", {})
    note = f"{n.get('val', '?')} validation and {n.get('test', '?')} test cells; the baselines on the same cells."
    return page_parts.table(header, rows, classes=classes) + f'<p class="note">{html.escape(note)}</p>'


def curves_figure(history: pd.DataFrame, metrics: dict) -> Figure:
    """Validation loss and cosine per epoch (0: before training), the best epoch starred, PCA dashed.

    The cosine axis reaches the mean-profile floor with a zoomed inset (as in ``exprae-compare``'s curves);
    the loss has no floor to show, so its title states the change from epoch 0 to the best epoch in units.
    """
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    best = metrics.get("best_epoch")
    for ax, (column, label) in zip(
        fig.subplots(1, 2), (("val/loss", "val loss ↓"), ("val/cosine", "val cosine ↑")), strict=True
    ):
        if column not in history:
            continue
        scored = metrics.get("val", {})
        pca = scored.get("pca", {}).get(column.split("/")[1])
        _draw_run_curve(ax, history, column, best=best, pca=pca)
        floor = scored.get("mean", {}).get(column.split("/")[1])
        title = label
        if column == "val/cosine" and floor is not None:
            ax.axhline(floor, color=figures.COLORS["mean"], ls=":", lw=1.5, label="mean profile, same cells")
            lo, hi = ax.dataLim.intervaly
            values = np.append(history[column].to_numpy(float), [] if pca is None else [pca])
            zoom = sweep_figures.zoom_inset(ax, values, full=(min(lo, floor), max(hi, floor)))
            if zoom is not None:
                _draw_run_curve(zoom, history, column, best=best, pca=pca)
                zoom.set_title(sweep_figures.zoom_title(zoom), fontsize=7)
        elif best is not None and (history["epoch"] == best).any() and (history["epoch"] == 0).any():
            start = history.loc[history["epoch"] == 0, column].iloc[0]
            change = history.loc[history["epoch"] == best, column].iloc[0] - start
            title = f"{label}\n(y zoomed; epoch 0 to best: {change:+.4f}, {100 * change / abs(start):+.2f} %)"
        ax.set_xlabel("epochs trained (0: the model before training)")
        ax.set_ylabel(label.rsplit(" ", 1)[0])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize="medium")
    # One legend below both panels: inside a panel it would cover the curve or the inset.
    entries = {label: h for ax in fig.axes for h, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    fig.legend(entries.values(), entries.keys(), loc="outside lower center", ncol=len(entries), fontsize="small")
    return fig


def _draw_run_curve(ax: Axes, history: pd.DataFrame, column: str, *, best: int | None, pca: float | None) -> None:
    """One run's validation curve, its PCA level and its best epoch (starred)."""
    ax.plot(history["epoch"], history[column], marker=".", color=figures.COLORS["model"], label="exprae")
    if pca is not None:
        ax.axhline(pca, color=figures.COLORS["pca"], ls="--", lw=1, label="PCA, same cells")
    if best is not None and (history["epoch"] == best).any():
        y = history.loc[history["epoch"] == best, column].iloc[0]
        ax.scatter(
            [best], [y], marker="*", s=160, color="gold", edgecolors="black", zorder=5, label=f"best epoch {best}"
        )


def worst_cells(cells: pd.DataFrame, n: int = N_WORST) -> str:
    """The ``n`` test cells the model reconstructs worst, with the baselines' cosine on the same cells."""
    test = cells[cells["split"] == "test"].nsmallest(n, "cosine")
    columns = [
        ("obs_name", "cell"),
        ("cosine", "exprae cosine"),
        ("pca_cosine", "PCA cosine"),
        ("meanprofile_cosine", "mean-profile cosine"),
    ]
    columns = [(c, label) for c, label in columns if c in test]
    rows = [[str(r[c]) if c == "obs_name" else f"{r[c]:.4f}" for c, _ in columns] for _, r in test.iterrows()]
    return page_parts.table([label for _, label in columns], rows)


def build(run_dir: str | Path) -> str:
    """The report of a finished run as an HTML string."""
    run_dir = Path(run_dir)
    metrics = rundir.read_json(run_dir / rundir.METRICS_FILE)
    history_path, cells_path = run_dir / rundir.HISTORY_FILE, run_dir / rundir.CELLS_FILE
    history = pd.read_csv(history_path) if history_path.is_file() else pd.DataFrame()
    cells = pd.read_csv(cells_path) if cells_path.is_file() else pd.DataFrame()
    best, stopped = metrics.get("best_epoch"), metrics.get("stopped")
    meta = [
        f"loss {metrics.get('loss')}, latent {metrics.get('latent_dim')}, {metrics.get('n_genes')} genes, seed {metrics.get('seed')}",
        f"trained {metrics.get('epochs_trained')} epochs; {stopped or 'stop reason not recorded'}; best epoch {best}",
    ]
    parts = [
        f"<h1>exprae run</h1><p class=meta>{html.escape(str(run_dir))}<br>{'<br>'.join(html.escape(m) for m in meta)}</p>",
        "<h2>Held-out results</h2>",
        results_table(metrics),
    ]
    if not history.empty:
        parts += [
            "<h2>Learning curves (validation cells)</h2>",
            page_parts.img(page_parts.figure_png(curves_figure(history, metrics)), alt="learning curves"),
        ]
    if not cells.empty:
        test = cells[cells["split"] == "test"]
        scores = {who: test[col].to_numpy() for who, col in CELL_COLUMNS.items() if col in test}
        histogram = figures.histogram_figure(scores, title=f"{len(test)} test cells, best checkpoint")
        parts += [
            "<h2>Per-cell cosine against the baselines (test cells)</h2>",
            page_parts.img(page_parts.figure_png(histogram), alt="per-cell cosine histogram"),
            f'<p class="note">The model beats PCA on {np.mean(scores["model"] > scores.get("pca", -np.inf)):.0%} of '
            "the test cells. Every cell's scores: cells.csv.</p>",
            f"<h2>The {min(N_WORST, len(test))} worst-reconstructed test cells</h2>",
            worst_cells(cells),
        ]
    return page_parts.page(f"exprae run {run_dir.name}", "".join(parts))


def write_run_report(run_dir: str | Path) -> Path:
    """Write ``report.html`` into the run directory; return its path."""
    path = Path(run_dir) / REPORT_FILE
    rundir.write_text_atomic(path, build(run_dir))
    return path


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["."]:
        print(write_run_report(arg))
