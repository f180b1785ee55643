"""scVI next to exprae on the same cells, the same molecule split and exprae's own scores.

    python scripts/scvi_side_by_side.py ../shared/realdata/pbmc4k_soupx.h5ad --latent 16 --out scvi_pbmc4k
    make scvi-side-by-side DATA=../shared/realdata/pbmc4k_soupx.h5ad LATENT=16

The data is prepared exactly as ``exprae-train data=h5ad data.path=FILE data.mcv.fraction=0.5`` prepares it
(same split, same x', same highly variable genes fitted on the training cells' x', same held-out x''). scvi-tools'
``SCVI`` (``n_latent`` matched, its defaults otherwise) is trained on the training cells' raw x' counts of those
genes, and its prediction for validation/test cells is scored with exprae's metric code:

* ``cosine``, ``pearson``, ``mse`` against the input ``T(x')`` and the MCV scores against ``T(x'')`` use the
  posterior-predictive expectation ``E[T(c)]`` (the draws of ``posterior_predictive_sample``, normalised with the cell's x'
  size factor as exprae's count models are); ``mcv_mse_log_of_mean`` shows the shortcut ``T(E[c])`` for contrast;
* ``mcv_poisson`` uses scVI's expected counts (its normalised expression times the cell's x' library).

The PCA (same size) and mean-profile baselines are fitted on the same training cells by exprae's own code.
Writes ``scores.csv``, ``metrics.json`` and the per-cell ``cells.csv`` (an exprae run's layout: scVI's columns
unprefixed, ``pca_*``, ``meanprofile_*``; so ``exprae.report.paired`` can pair scVI with an exprae run cell by
cell) under ``--out`` and prints the table.
scvi-tools is an optional extra: ``pip install "scvi-tools>=1.1" "torch==2.13.0"`` (the pin keeps exprae's torch).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from hydra.utils import instantiate

from exprae.constants import MCV_COUNTS_KEY, MCV_TARGET_KEY, SIZE_FACTOR_KEY, X_KEY
from exprae.data import ExpressionDataModule
from exprae.nn.baselines import Baselines
from exprae.nn.count_head import InputView
from exprae.runs.rundir import CELLS_FILE
from exprae.scoring.mcv import MCVScorer, poisson_nll
from exprae.scoring.metrics import per_cell_metrics
from exprae.scoring.peer_models import posterior_predictive_mean
from exprae.train import compose

INSTALL = 'pip install "scvi-tools>=1.1" "torch==2.13.0"   (or: pip install -e ".[bench]" "torch==2.13.0")'


def datamodule(path: Path, args: argparse.Namespace) -> ExpressionDataModule:
    """exprae's own data preparation for ``data=h5ad`` with the molecule split on."""
    overrides = [
        "data=h5ad",
        f"data.path={path}",
        "data.mcv.fraction=0.5",
        f"data.mcv.seed={args.mcv_seed}",
        f"data.split_seed={args.split_seed}",
        *args.data_overrides,
    ]
    dm: ExpressionDataModule = instantiate(compose(overrides).data)  # nothing is trained: no run directory is made
    dm.setup("fit")
    return dm


def training_counts(dm: ExpressionDataModule) -> ad.AnnData:
    """Raw x' counts of every cell on the model's genes: the same draw the datamodule made (same seed, same rows)."""
    full = dm.load_raw()
    raw = full if dm.layer in (None, "X") else ad.AnnData(X=full.layers[dm.layer], obs=full.obs, var=full.var)
    x_train, _ = dm.mcv.split(
        raw.X, np.arange(raw.n_obs), what=dm.source, obs_names=raw.obs_names, var_names=raw.var_names
    )
    keep = raw.var_names.get_indexer(dm.var_names)
    counts = ad.AnnData(X=sp.csr_matrix(x_train)[:, keep], obs=pd.DataFrame(index=raw.obs_names))
    counts.var_names = dm.var_names
    return counts


def cell_scores(
    pred_ng: torch.Tensor, batch: dict[str, torch.Tensor], count_mean_ng: torch.Tensor
) -> dict[str, np.ndarray]:
    """exprae's per-cell scores: against the input x' and against the held-out x'' (``mcv_*``)."""
    own = {k: v.numpy() for k, v in per_cell_metrics(pred_ng, batch[X_KEY]).items()}
    held = {f"mcv_{k}": v.numpy() for k, v in per_cell_metrics(pred_ng, batch[MCV_TARGET_KEY]).items()}
    held["mcv_poisson"] = poisson_nll(batch[MCV_COUNTS_KEY], count_mean_ng).numpy()
    return {**own, **held}


CELL_PREFIX = {"scvi": "", "pca": "pca_", "mean": "meanprofile_"}  # the layout of an exprae run's cells.csv


def averaged(per_cell: dict[str, np.ndarray]) -> dict[str, float]:
    """The mean over cells of each per-cell score."""
    return {name: float(values.mean()) for name, values in per_cell.items()}


def run(args: argparse.Namespace) -> tuple[dict, pd.DataFrame]:
    import scvi

    start = time.perf_counter()
    dm = datamodule(args.data, args)
    counts = training_counts(dm)
    train_rows = dm.splits["train"]
    scvi.settings.seed = args.seed
    adata_train = counts[train_rows].copy()
    scvi.model.SCVI.setup_anndata(adata_train)
    model = scvi.model.SCVI(adata_train, n_latent=args.latent)
    fit_start = time.perf_counter()
    model.train(max_epochs=args.max_epochs, accelerator="cpu", enable_progress_bar=False)
    fit_seconds = time.perf_counter() - fit_start

    baselines = Baselines(dm.n_genes, args.latent).fit(dm.train_chunks())
    scorer = MCVScorer(dm.mcv, dm.preprocess)
    view = InputView(dm.n_genes).fit(dm.preprocess)
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    cells: dict[str, pd.DataFrame] = {}
    for stage in ("val", "test"):
        data = dm.split_dataset(stage)
        batch = data[np.arange(len(data))]
        size_factor_n = batch[SIZE_FACTOR_KEY]
        held = counts[dm.splits[stage]].copy()
        if not held.obs_names.equals(dm.adata.obs_names[dm.splits[stage]]):
            raise RuntimeError(f"the {stage} cells of the raw counts and of the prepared data are not the same cells")
        # Posterior-predictive draws of counts at the cell's own x' depth, each mapped into exprae's input space.
        expected_view = posterior_predictive_mean(
            model, held, lambda c_bg, rows, sf_n=size_factor_n: view(c_bg, sf_n[rows]), n_samples=args.n_samples
        )
        library_n = torch.as_tensor(np.asarray(held.X.sum(axis=1)).ravel(), dtype=torch.float32)
        rho = model.get_normalized_expression(held, library_size=1.0, n_samples=args.n_samples, return_mean=True)
        mean_ng = torch.as_tensor(np.asarray(rho), dtype=torch.float32) * library_n.unsqueeze(-1)
        per_cell = {
            "scvi": cell_scores(
                expected_view, batch, scorer.count_mean(params={"log_mu": mean_ng.clamp_min(1e-12).log()})
            )
        }
        for who, recon in baselines(batch[X_KEY]).items():
            per_cell[who] = cell_scores(recon, batch, scorer.count_mean(recon_ng=recon, size_factor_n=size_factor_n))
        cells[stage] = pd.DataFrame(
            {
                "obs_name": held.obs_names,
                "split": stage,
                **{
                    f"{CELL_PREFIX[who]}{name}": values
                    for who, scores in per_cell.items()
                    for name, values in scores.items()
                },
            }
        )
        scvi_scores = averaged(per_cell["scvi"])
        scvi_scores["mcv_mse_log_of_mean"] = float(
            per_cell_metrics(view(mean_ng, size_factor_n), batch[MCV_TARGET_KEY])["mse"].mean()
        )
        metrics[stage] = {
            "scvi": scvi_scores,
            **{who: averaged(scores) for who, scores in per_cell.items() if who != "scvi"},
        }
    result = {
        "method": "scvi-tools SCVI",
        "scvi_version": scvi.__version__,
        "data": str(args.data),
        "latent_dim": args.latent,
        "n_cells": {split: len(idx) for split, idx in dm.splits.items()},
        "n_genes": dm.n_genes,
        "max_epochs": args.max_epochs,
        "fit_seconds": round(fit_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        **metrics,
    }
    return result, pd.concat([cells["val"], cells["test"]], ignore_index=True)


def table(result: dict) -> pd.DataFrame:
    """One row per method and stage."""
    labels = {"scvi": f"scVI ({result['latent_dim']} latent)", "pca": f"PCA ({result['latent_dim']} comps)"}
    labels["mean"] = "mean profile"
    rows = [
        {"method": labels[who], "stage": stage, **scores}
        for stage in ("val", "test")
        for who, scores in result[stage].items()
    ]
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path, help="an .h5ad of raw counts (X), e.g. ../shared/realdata/pbmc4k_soupx.h5ad")
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("scvi_side_by_side"))
    parser.add_argument("--max-epochs", type=int, default=None, help="scVI's default when unset")
    parser.add_argument("--n-samples", type=int, default=32, help="posterior-predictive draws per cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mcv-seed", type=int, default=0)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument(
        "data_overrides", nargs="*", help="extra data.* overrides, e.g. data.preprocess.n_top_genes=1000"
    )
    # Intermixed: the data.* overrides may follow the options (plain parse_args leaves them unrecognised).
    args = parser.parse_intermixed_args(argv)
    if importlib.util.find_spec("scvi") is None:
        print(f"scvi_side_by_side: scvi-tools is not installed; install it with\n  {INSTALL}", file=sys.stderr)
        return 2
    if args.out.exists() and any(args.out.iterdir()):
        print(f"scvi_side_by_side: {args.out} is not empty; choose another --out", file=sys.stderr)
        return 1
    result, cells = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(result, indent=2))
    cells.to_csv(args.out / CELLS_FILE, index=False, float_format="%.6g")
    frame = table(result)
    frame.to_csv(args.out / "scores.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 4):
        print(frame.set_index(["stage", "method"])[["mcv_mse", "mcv_cosine", "mcv_poisson", "cosine", "mse"]])
    print(f"\nscVI fit {result['fit_seconds']} s, total {result['total_seconds']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
