"""Markdown tables of an MSE-vs-cosine sweep: mean ± sd over seeds of the model and baselines per setting.

    python scripts/study_tables.py multirun/mse_vs_cosine/DATE/TIME [more sweep dirs] [--stage test]

Reads each run's ``.hydra/overrides.yaml`` and ``metrics.json`` (runs without metrics.json are listed as
unfinished); groups by every override except ``seed``. This is the aggregation docs/mse_vs_cosine.md was
written from; ``exprae-compare`` gives the same numbers with plots once it is available.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from exprae.report.sweep_runs import find_runs

WHO = ("model", "pca", "mean")
COLUMNS = {
    "cosine": "cosine",
    "cosine_p10": "cos p10",
    "pearson": "pearson",
    "mse": "MSE",
    "masked_cosine": "masked cos",
    "masked_pearson": "masked r",
    "masked_mse": "masked MSE",
    "cosine_to_truth": "cos→truth",
    "pearson_to_truth": "r→truth",
    "mse_to_truth": "MSE→truth",
}


def load_runs(sweeps: list[Path]) -> tuple[list[tuple[dict[str, str], dict]], list[Path]]:
    """(overrides, metrics) of every finished run under the sweep directories, and the unfinished runs."""
    runs, unfinished = [], []
    for run in (r for sweep in sweeps for r in find_runs(sweep)):
        if not run.finished:
            unfinished.append(run.path)
            continue
        overrides = {k: v for k, v in run.overrides.items() if k != "experiment"}
        runs.append((overrides, run.metrics))
    return runs, unfinished


def _fmt(values: list[float], *, sd: bool, signed: bool = False, digits: int | None = None) -> str:
    mean = statistics.fmean(values)
    digits = digits if digits is not None else (4 if abs(mean) < 10 else 1)
    sign = "+" if signed else ""
    if not sd or len(values) < 2:
        return f"{mean:{sign}.{digits}f}"
    return f"{mean:{sign}.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def tables(runs: list[tuple[dict[str, str], dict]], *, stage: str) -> str:
    """One markdown table per (data, latent_dim): a row per loss (mean ± sd over seeds) and per baseline."""
    groups: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for overrides, metrics in runs:
        key = (overrides.get("data", "default"), overrides.get("model.latent_dim", str(metrics["latent_dim"])))
        groups[key][overrides.get("loss", "mse")].append(metrics[stage])
    out = []
    for (data, latent), by_loss in sorted(groups.items(), key=lambda kv: (kv[0][0], int(kv[0][1]))):
        first = next(iter(by_loss.values()))[0]
        cols = [c for c in COLUMNS if c in first["model"]]
        out.append(f"**{data}, latent {latent}** ({stage} cells; model rows mean ± sd over n seeds)\n")
        out.append("| | n | " + " | ".join(COLUMNS[c] for c in cols) + " |")
        out.append("|---" * (len(cols) + 2) + "|")
        for loss in ("mse", "cosine", "mixed"):
            if loss in by_loss:
                rows = by_loss[loss]
                values = " | ".join(_fmt([r["model"][c] for r in rows], sd=True) for c in cols)
                out.append(f"| {loss} | {len(rows)} | {values} |")
        for who, label in (("pca", f"PCA-{latent}"), ("mean", "mean profile")):
            out.append(f"| {label} | | " + " | ".join(_fmt([first[who][c]], sd=False) for c in cols) + " |")
        out.append("")
    return "\n".join(out)


def key_table(runs: list[tuple[dict[str, str], dict]], *, stage: str) -> str:
    """How far above PCA each loss lands: model − PCA in cosine and MSE (relative), mean ± sd over seeds."""
    groups: dict[tuple[str, int, str], list[dict]] = defaultdict(list)
    for overrides, metrics in runs:
        groups[(overrides.get("data", "default"), int(metrics["latent_dim"]), overrides.get("loss", "mse"))].append(
            metrics[stage]
        )
    lines = [
        f"| data | latent | loss | n | {stage} cosine | PCA cosine | Δ cosine vs PCA | Δ MSE vs PCA | Δ masked cos vs PCA | Δ cos→truth vs PCA |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (data, latent, loss), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        pca = rows[0]["pca"]
        cos = [r["model"]["cosine"] for r in rows]
        d_cos = [c - pca["cosine"] for c in cos]
        d_mse = [100 * (r["model"]["mse"] / pca["mse"] - 1) for r in rows]
        extra = [
            _fmt([r["model"][m] - pca[m] for r in rows], sd=True, signed=True) if m in pca else "–"
            for m in ("masked_cosine", "cosine_to_truth")
        ]
        lines.append(
            f"| {data} | {latent} | {loss} | {len(rows)} | {_fmt(cos, sd=True)} | {pca['cosine']:.4f} | "
            f"{_fmt(d_cos, sd=True, signed=True)} | {_fmt(d_mse, sd=True, signed=True, digits=1)} % | {extra[0]} | {extra[1]} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", type=Path)
    parser.add_argument("--stage", choices=("val", "test"), default="test")
    args = parser.parse_args()
    runs, unfinished = load_runs(args.sweeps)
    print(key_table(runs, stage=args.stage), end="\n\n")
    print(tables(runs, stage=args.stage))
    print(f"{len(runs)} finished runs" + (f"; unfinished: {', '.join(map(str, unfinished))}" if unfinished else ""))


if __name__ == "__main__":
    main()
