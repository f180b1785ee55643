"""Sweep figures do not exaggerate: y-axes reach the mean-profile floor, zooms say so, best epochs are marked."""

from __future__ import annotations

import numpy as np
import pandas as pd

from exprae.report.figures import curves_plot, metrics_plot

SETTINGS = ("loss=mse", "loss=cosine")


def _curves() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two settings x two seeds, 9 epochs, val cosine 0.415..0.419 (a 0.004 difference); mean profile at -0.02."""
    rows = []
    for k, setting in enumerate(SETTINGS):
        for seed in (0, 1):
            best = 8 - 2 * k  # cosine runs peak at epoch 6
            for epoch in range(9):
                cosine = 0.415 + 0.0005 * min(epoch, best) - 0.0002 * max(epoch - best, 0) + 0.0001 * seed
                rows += [
                    {"tag": "val/cosine", "epoch": epoch, "value": cosine, "setting": setting, "best_epoch": best},
                    {"tag": "val/mse", "epoch": epoch, "value": 1.24 - cosine, "setting": setting, "best_epoch": best},
                ]
    summary = pd.DataFrame(
        {
            "setting": SETTINGS,
            "val/pca/cosine/mean": 0.415,
            "val/pca/mse/mean": 0.825,
            "val/mean/cosine/mean": -0.02,
            "val/mean/mse/mean": 1.015,
        }
    )
    return pd.DataFrame(rows), summary


def test_curves_reach_the_floor_and_zoom_only_in_a_labelled_inset():
    curves, summary = _curves()
    fig = curves_plot(curves, summary)
    cosine_ax, mse_ax = fig.axes[0], next(a for a in fig.axes if a.get_title() == "val MSE ↓")
    lo, hi = cosine_ax.get_ylim()
    assert lo < -0.02 and hi > 0.419, "the cosine axis is zoomed past the mean-profile floor"
    lo, hi = mse_ax.get_ylim()
    assert lo < 0.821 and hi > 1.015, "the MSE axis is zoomed past the mean-profile floor"
    (inset,) = cosine_ax.child_axes
    zlo, zhi = inset.get_ylim()
    assert zhi - zlo < 0.01 and inset.get_title() == f"zoom: y from {zlo:.4f} to {zhi:.4f}"


def test_curves_mark_each_runs_best_epoch():
    curves, summary = _curves()
    fig = curves_plot(curves, summary)
    stars = [c for c in fig.axes[0].collections if c.get_offsets().size and c.get_paths()]
    starred = sorted(
        (int(x), round(float(y), 6)) for c in stars if c.get_sizes().tolist() == [90.0] for x, y in c.get_offsets()
    )
    expected = curves[(curves["tag"] == "val/cosine") & (curves["epoch"] == curves["best_epoch"])]
    assert starred == sorted(zip(expected["epoch"], expected["value"].round(6), strict=True))
    assert [int(x) for x, _ in starred].count(6) == 2, "the cosine runs' best epoch (6) is not marked"


def test_metrics_figure_with_two_settings_keeps_points_legend_and_span_apart():
    summary = pd.DataFrame({"setting": SETTINGS})
    for stage in ("val", "test"):
        for metric, model, floor in (("cosine", 0.41, -0.02), ("mse", 0.82, 1.02), ("pearson", 0.41, -0.02)):
            summary[f"{stage}/model/{metric}/mean"] = [model, model + 0.0005]
            summary[f"{stage}/model/{metric}/sd"] = 0.0002
            summary[f"{stage}/pca/{metric}/mean"] = model - 0.003
            summary[f"{stage}/mean/{metric}/mean"] = floor
    table = pd.DataFrame(
        {"run": ["0", "1", "2", "3"], "loss": ["mse", "mse", "cosine", "cosine"], "seed": [0, 1, 0, 1]}
    )
    for col in [c.rsplit("/", 1)[0] for c in summary.columns if c.endswith("/mean") and "/model/" in c]:
        table[col] = np.repeat(summary[f"{col}/mean"].to_numpy(), 2)
    verdict = ["test cosine: loss=cosine best, by 0.0005 over loss=mse: no clear winner yet (2 seeds)"]
    fig = metrics_plot(table, summary, ["loss"], verdict=verdict)
    assert f"Verdict, {verdict[0]}" in [t.get_text() for t in fig.texts], "the verdict is not on the figure"
    panels = [a for a in fig.axes if a.get_title()]
    assert len(panels) == 6
    for ax in panels:
        assert ax.get_legend() is None, "a legend inside a panel covers its points"
        assert "settings span 0.0005" in ax.get_title()
        left, right = ax.get_xlim()
        assert left <= -0.5 and right >= 1.5, "the outer settings sit on the panel's edge"
    assert fig.legends, "the figure has no legend"
    cosine = panels[0]
    assert cosine.get_ylim()[0] < -0.02, "the y-axis does not reach the mean-profile floor"


def test_run_report_curves_reach_the_floor_and_state_the_loss_change():
    from exprae.report.run_report import curves_figure

    history = pd.DataFrame(
        {
            "epoch": range(9),
            "val/loss": 0.8258 - 0.0003 * np.arange(9),
            "val/cosine": 0.4152 + 0.0004 * np.arange(9),
        }
    )
    metrics = {"best_epoch": 8, "val": {"pca": {"cosine": 0.4152, "loss": None}, "mean": {"cosine": -0.0201}}}
    fig = curves_figure(history, metrics)
    loss_ax, cosine_ax = (a for a in fig.axes if a.get_title())
    assert cosine_ax.get_ylim()[0] < -0.0201, "the cosine axis is zoomed past the mean-profile floor"
    (inset,) = cosine_ax.child_axes
    assert inset.get_title().startswith("zoom: y from 0.41")
    assert "epoch 0 to best: -0.0024, -0.29 %" in loss_ax.get_title(), loss_ax.get_title()
    stars = [o for c in cosine_ax.collections for o in c.get_offsets() if c.get_sizes().tolist() == [160.0]]
    assert [int(x) for x, _ in stars] == [8], "the best epoch is not starred"
