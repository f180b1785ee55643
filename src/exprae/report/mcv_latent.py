"""Latent size without ground truth: per loss, the latent size with the best MCV score (``exprae-compare``).

With a molecule split (``data.mcv.fraction=0.5``) every run is scored against held-out molecules, whose
expected score is minimised by the true expression (docs/mcv.md). Over a sweep of ``model.latent_dim`` the
size with the lowest ``mcv_mse`` is therefore the one that denoises best, and the seed-to-seed spread says
whether its lead is real. PCA gets the same question from its baseline rows.

The ranking itself is ``exprae-compare``'s (``decide``, passed in): this module answers one question with it,
and importing the entry point back from here would be an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

LATENT_KEY = "model.latent_dim"
MCV_METRIC = "mcv_mse"


def latent_verdicts(summary: pd.DataFrame, keys: Sequence[str], *, stage: str, decide: Callable[..., Any]) -> list:
    """One :class:`exprae.compare.Verdict` per setting of the other swept keys (usually: per loss) on mcv_mse.

    ``decide`` is :func:`exprae.compare.decide`, which ranks the settings and tests the best against the rest.
    """
    col = f"{stage}/model/{MCV_METRIC}/mean"
    if LATENT_KEY not in keys or col not in summary:
        return []
    others = [k for k in keys if k != LATENT_KEY]
    groups = summary.groupby(others, sort=False) if others else [((), summary)]
    verdicts = []
    for values, members in groups:
        values = values if isinstance(values, tuple) else (values,)
        label = ", ".join(f"{k}={v}" for k, v in zip(others, values, strict=True)) or "all runs"
        ranked = members.assign(setting=f"{LATENT_KEY}=" + members[LATENT_KEY].astype(str))
        verdicts.append(decide(ranked, metric=MCV_METRIC, stage=stage, panel=label))
    return verdicts


def pca_best_latent(summary: pd.DataFrame, *, stage: str) -> tuple[str, float] | None:
    """The PCA size with the lowest mean MCV score over the sweep's runs, and that score (None without MCV)."""
    col = f"{stage}/pca/{MCV_METRIC}/mean"
    if col not in summary or LATENT_KEY not in summary:
        return None
    by_size = summary.groupby(LATENT_KEY)[col].mean()
    return str(by_size.idxmin()), float(by_size.min())


def markdown_section(
    summary: pd.DataFrame, keys: Sequence[str], *, stage: str, decide: Callable[..., Any]
) -> list[str]:
    """The ``## Latent size by MCV`` lines of the sweep report; empty when the sweep has no MCV or latent sweep."""
    verdicts = latent_verdicts(summary, keys, stage=stage, decide=decide)
    if not verdicts:
        return []
    lines = [
        "",
        f"## Latent size by MCV ({stage} cells, held-out molecules; lower mcv_mse is better)",
        "",
        "| within | best latent | mcv_mse | runner-up | its mcv_mse | lead exceeds seed spread |",
        "|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        second = v.runner_up
        exceeds = {True: "yes", False: "no", None: "cannot tell (< 2 seeds)"}[v.exceeds_spread]
        best = v.best.removeprefix(f"{LATENT_KEY}=")
        if second is None:
            lines.append(f"| {v.panel} | {best} | {_pm(v.best_mean, v.best_sd)} | - | - | - |")
            continue
        runner = second.setting.removeprefix(f"{LATENT_KEY}=")
        lines.append(
            f"| {v.panel} | {best} | {_pm(v.best_mean, v.best_sd)} | {runner} | {_pm(second.mean, second.sd)} | "
            f"{exceeds} |"
        )
    pca = pca_best_latent(summary, stage=stage)
    if pca is not None:
        lines += ["", f"PCA on the same cells is best by MCV at {pca[0]} components (mcv_mse {pca[1]:.4f})."]
    lines += ["", *(f"- {v.sentence()}" for v in verdicts)]
    return lines


def _pm(mean: float, sd: float) -> str:
    return f"{mean:.4f}" if pd.isna(sd) else f"{mean:.4f} ± {sd:.4f}"
