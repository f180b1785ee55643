"""MSE or cosine on the synthetic grid (issue 22 part 6), judged by the truth: tables with paired intervals.

    exprae-train -m experiment=synthetic_grid            # 8 conditions x {mse, cosine} x generator seeds 0-2
    python scripts/synthetic_grid.py multirun/synthetic_grid/<date>/<time> [more sweep dirs]

Reads the sweep's runs (several sweep directories are read as one: a grid run in parts) (``exprae.report.sweep_runs``) and each run's ``cells.csv``. Per condition
(``synthetic_grid=...``) it reports, on the test cells, every method's mean MSE to the truth (``--metric``, by
default ``mse_to_rate_truth``: E[T(x) | rate], what MCV estimates; lower is better) over the generator seeds,
and the paired differences, cell by cell on the same cells, with the bootstrap ``exprae-compare`` uses
(:func:`exprae.report.paired.paired_bootstrap`): MSE loss − cosine loss, and each loss's model − PCA, spherical
PCA and kNN smoothing (negative: the model is closer to the truth). All generator seeds of a condition form one
group, so each replicate redraws the seeds (datasets) and the cells: the interval is over cells and generator
seeds. The condition's realised zero fraction and library/state correlation are recomputed from the generator
settings each run recorded. Writes ``synthetic_grid_<metric>.md`` and ``.csv`` into the first sweep directory.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from exprae.data.datasets import synthetic_counts
from exprae.report.paired import PairedDifference, pair_runs, paired_bootstrap, read_cells
from exprae.report.sweep_runs import Run, find_runs

CONDITION_KEY = "synthetic_grid"
BASELINES = {"pca": "PCA", "spherical_pca": "spherical PCA", "knn": "kNN smoothing", "mean": "mean profile"}
LOSSES = ("mse", "cosine")


def _condition(run: Run) -> str:
    return run.overrides.get(CONDITION_KEY, "base")


def _value(run: Run, key: str):
    """A config value, following plain interpolations (``data.synthetic.seed: ${seed}``: Hydra's file keeps them)."""
    value = run.config[key]
    while isinstance(value, str) and value.startswith("${") and value.endswith("}"):
        value = run.config[value[2:-1]]
    return value


def _generator_seed(run: Run) -> int:
    return int(_value(run, "data.synthetic.seed"))


def _runs_by(runs: Sequence[Run], condition: str, loss: str) -> dict[tuple, Path]:
    """The finished runs of one condition and loss, keyed ``("all", generator seed)``: one bootstrap group."""
    return {
        ("all", _generator_seed(r)): r.path
        for r in runs
        if r.finished and _condition(r) == condition and r.overrides.get("loss", "mse") == loss
    }


def _within_run_pairs(paths: dict[tuple, Path], column: str, baseline: str, stage: str) -> list:
    """Pairs (model, baseline) of per-cell scores from the same runs' cells.csv: the same cells by construction."""
    pairs = []
    for key, path in sorted(paths.items(), key=str):
        cells = read_cells(path)
        if cells is None or column not in cells or f"{baseline}_{column}" not in cells:
            continue
        rows = cells[cells["split"] == stage]
        pairs.append((rows[column].to_numpy(), rows[f"{baseline}_{column}"].to_numpy(), str(key[0])))
    return pairs


def _data_facts(run: Run) -> dict[str, float]:
    """The realised zero fraction and corr(log library, first program) of the run's generated counts."""
    prefix = "data.synthetic."
    settings = {k.removeprefix(prefix): _value(run, k) for k in run.config if k.startswith(prefix)}
    settings["store_truth"] = False
    adata = synthetic_counts(**settings)
    counts = adata.X
    zeros = 1.0 - counts.nnz / (adata.n_obs * adata.n_vars)
    corr = np.corrcoef(np.log(adata.obs["true_library_size"]), adata.obsm["X_true"][:, 0])[0, 1]
    return {"zeros": zeros, "library_state_corr": float(corr)}


def _text(p: PairedDifference | None, digits: int = 4) -> str:
    if p is None:
        return "-"
    interval = p.intervals["mean"]
    return interval.text(digits) + (" *" if interval.excludes_zero else "")


def summarise(sweep_dirs: Sequence[Path], *, metric: str, stage: str, n_boot: int) -> tuple[pd.DataFrame, str]:
    """One row per condition (means and paired intervals) and its markdown."""
    finished = [r for d in sweep_dirs for r in find_runs(d) if r.finished]
    if not finished:
        raise ValueError(f"no finished runs under {', '.join(map(str, sweep_dirs))}")
    conditions = list(dict.fromkeys(_condition(r) for r in finished))
    rows = []
    for condition in conditions:
        members = [r for r in finished if _condition(r) == condition]
        row: dict = {"condition": condition, "generator_seeds": sorted({_generator_seed(r) for r in members})}
        row.update(_data_facts(members[0]))
        row["epochs"] = "/".join(
            f"{r.overrides.get('loss')}:{r.metrics['best_epoch']}/{r.metrics['epochs_trained']}"
            for r in sorted(members, key=lambda r: (r.overrides.get("loss", ""), _generator_seed(r)))
        )
        for loss in LOSSES:
            of_loss = [r for r in members if r.overrides.get("loss", "mse") == loss]
            row[f"model_{loss}"] = np.mean([r.metrics[stage]["model"][metric] for r in of_loss]) if of_loss else np.nan
            row[f"kept_start_{loss}"] = sum(r.metrics["best_epoch"] == 0 for r in of_loss)
        # The baselines do not depend on the loss (same data, split and fit): read them off the MSE runs.
        reference = [r for r in members if r.overrides.get("loss", "mse") == "mse"] or members
        for who in BASELINES:
            row[who] = np.mean([r.metrics[stage][who][metric] for r in reference if who in r.metrics[stage]])
        mse_runs, cos_runs = _runs_by(finished, condition, "mse"), _runs_by(finished, condition, "cosine")
        pairs = pair_runs(mse_runs, cos_runs, stage=stage, column=metric)
        diff = paired_bootstrap(pairs, n_boot=n_boot) if pairs else None
        row["mse_minus_cosine"] = _text(diff)
        row["n_cells"] = None if diff is None else diff.n_cells
        row["n_pairs"] = None if diff is None else diff.n_pairs
        if pairs:  # each generator seed on its own: does the sign hold on every dataset?
            row["per_seed"] = " ".join(f"{(a - b).mean():+.4f}" for a, b, _ in pairs)
        for loss, paths in (("mse", mse_runs), ("cosine", cos_runs)):
            for who in ("pca", "spherical_pca", "knn"):
                pairs = _within_run_pairs(paths, metric, who, stage)
                row[f"{loss}_minus_{who}"] = _text(paired_bootstrap(pairs, n_boot=n_boot) if pairs else None)
        rows.append(row)
    table = pd.DataFrame(rows)
    return table, _markdown(table, metric=metric, stage=stage, sweep_dirs=sweep_dirs)


def _markdown(table: pd.DataFrame, *, metric: str, stage: str, sweep_dirs: Sequence[Path]) -> str:
    means = [
        "| condition | zeros | corr(log lib, state) | exprae MSE | exprae cosine | PCA | spherical PCA | kNN | mean "
        "| MSE − cosine [95 % CI] | per generator seed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, r in table.iterrows():
        means.append(
            f"| {r['condition']} | {r['zeros']:.1%} | {r['library_state_corr']:+.2f} | {r['model_mse']:.4f} | "
            f"{r['model_cosine']:.4f} | {r['pca']:.4f} | {r['spherical_pca']:.4f} | {r['knn']:.4f} | "
            f"{r['mean']:.4f} | {r['mse_minus_cosine']} | {r.get('per_seed', '-')} |"
        )
    versus = [
        "| condition | MSE − PCA | MSE − spherical PCA | MSE − kNN | cosine − PCA | cosine − spherical PCA "
        "| cosine − kNN | runs kept at the PCA start (mse, cosine) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, r in table.iterrows():
        versus.append(
            f"| {r['condition']} | {r['mse_minus_pca']} | {r['mse_minus_spherical_pca']} | {r['mse_minus_knn']} | "
            f"{r['cosine_minus_pca']} | {r['cosine_minus_spherical_pca']} | {r['cosine_minus_knn']} | "
            f"{r['kept_start_mse']}, {r['kept_start_cosine']} |"
        )
    return "\n".join(
        [
            f"# Synthetic grid {', '.join(map(str, sweep_dirs))}",
            "",
            f"{stage} cells, `{metric}` (lower is better), mean over generator seeds; differences are paired per "
            "cell, mean [95 % bootstrap interval over cells and generator seeds], `*` where it excludes 0.",
            "",
            *means,
            "",
            "Each model against the baselines on the same cells (negative: the model is closer to the truth):",
            "",
            *versus,
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry: summarise a synthetic_grid sweep."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dirs", type=Path, nargs="+", help="the grid's multirun directories")
    parser.add_argument("--metric", default="mse_to_rate_truth", help="a per-cell column of cells.csv")
    parser.add_argument("--stage", default="test", choices=("val", "test"))
    parser.add_argument("--n-boot", type=int, default=2000)
    args = parser.parse_args(argv)
    try:
        table, markdown = summarise(args.sweep_dirs, metric=args.metric, stage=args.stage, n_boot=args.n_boot)
    except (FileNotFoundError, ValueError) as err:
        print(f"synthetic_grid: {err}", file=sys.stderr)
        return 1
    stem = args.sweep_dirs[0] / f"synthetic_grid_{args.metric}"
    table.to_csv(stem.with_suffix(".csv"), index=False)
    stem.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)
    print(f"\nwrote {stem.with_suffix('.md')} and {stem.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
