"""Batch covariates where the answer is known: exprae with and without ``data.batch_key``, PCA, and scVI.

Two datasets, the same held-out test cells and the same scores for every method:

* **pbmc4k, semi-synthetic** (``../shared/realdata/pbmc4k_soupx.h5ad``): the cells are split at random into two
  halves, A and B; B's counts get a gene-wise multiplicative batch effect, ``x' = f_g · x`` stochastically
  rounded to integers, with ``log f_g ~ N(0, effect_sd²)`` (seeded), and keep their cell types. The truth is known: the batch is pure
  artefact, so a good latent mixes A and B (iLISI up) while keeping cell types apart (cLISI, label silhouette).
* **Kang 2018** ctrl / stim PBMCs (``kang2018_pbmc_ifnb_2k.h5ad``, ``obs.condition``): a real condition effect
  and no cell-type labels, so only batch mixing and reconstruction are scored.

Methods: exprae without covariate, exprae with ``data.batch_key`` (per-batch-centred PCA start, decoder and
encoder covariates), PCA and per-batch PCA (the baselines of the covariate run, same latent size), and scVI
with ``batch_key`` (if ``scvi-tools`` is installed: ``make batch-bench`` installs it, or
``pip install -e ".[bench]" "torch==2.13.0"``), trained on the same training cells and highly variable genes.

Scores, on the test cells: reconstruction cosine in exprae's input space (log1p of counts normalised to 1e4
per cell, 2,000 HVGs; scVI's is its posterior mean expression mapped to that space), iLISI, cLISI, label
silhouette and batch silhouette (scIB's formulas, :mod:`exprae.scoring.integration`).

python scripts/batch_benchmark.py --out bench/batches            # ~15 min on 2 CPU cores
python scripts/batch_benchmark.py --epochs 3 --scvi-epochs 5 --cells 600 --n-top-genes 500   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

import exprae
from exprae.data.covariates import recode
from exprae.scoring.integration import integration_scores
from exprae.scoring.metrics import per_cell_metrics
from exprae.scoring.peer_models import posterior_predictive_mean

REALDATA = Path(os.environ.get("EXPRAE_REALDATA", Path(__file__).resolve().parents[2] / "shared" / "realdata"))
SCORES = ("cosine", "ilisi", "clisi", "silhouette_label", "silhouette_batch")


def semisynthetic(path: Path, *, seed: int, effect_sd: float, n_cells: int | None = None) -> ad.AnnData:
    """pbmc4k split into halves A and B at random; B's counts become f_g · x (stochastically rounded), log f_g ~ N(0, sd²)."""
    adata = ad.read_h5ad(path)
    # Not default_rng(seed): exprae's split draws default_rng(data.split_seed).permutation(n_cells), so with both
    # seeds 0 the halves were that same permutation and every held-out cell fell in B (no batch mixing to score).
    # A stream of its own, keyed by the seed: default_rng([seed, 1]) shares no draws with default_rng(seed).
    rng = np.random.default_rng([seed, 1])
    if n_cells is not None and n_cells < adata.n_obs:
        adata = adata[np.sort(rng.choice(adata.n_obs, n_cells, replace=False))].copy()
    x = sp.csr_matrix(adata.X, dtype=np.float32)
    in_b = np.zeros(adata.n_obs, dtype=bool)
    in_b[rng.permutation(adata.n_obs)[: adata.n_obs // 2]] = True
    factor_g = np.exp(rng.normal(0.0, effect_sd, size=adata.n_vars))
    b = x[in_b].tocsr()
    # Stochastic rounding keeps integer counts with the expected value f_g x and adds little noise (at most a
    # Bernoulli's), so the effect is a gene-wise shift of B, not extra noise in B.
    scaled = b.data * factor_g[b.indices]
    b.data = (np.floor(scaled) + (rng.random(len(scaled)) < scaled - np.floor(scaled))).astype(np.float32)
    b.eliminate_zeros()
    x = sp.vstack([x[~in_b], b], format="csr")
    order = np.concatenate([np.flatnonzero(~in_b), np.flatnonzero(in_b)])
    obs = adata.obs.iloc[order][["cell_type"]].copy()
    obs["batch"] = pd.Categorical(np.where(in_b[order], "B", "A"))
    out = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=adata.var_names))
    out.uns["batch_effect"] = {
        "seed": seed,
        "effect_sd": effect_sd,
        "model": "B = stochastic_round(f_g x), log f_g ~ N(0, sd^2)",
    }
    return out[np.argsort(order)].copy()  # back to the file's cell order


def train_exprae(
    data: Path, out_dir: Path, *, batch_key: str | None, label_key: str | None, seed: int, args: Any
) -> Path:
    """One exprae run composed from the real configs (default h5ad preprocessing); returns its run directory."""
    from exprae.train import compose, train

    overrides = [
        "data=h5ad",
        f"data.path={data}",
        f"data.preprocess.n_top_genes={args.n_top_genes}",
        f"model.latent_dim={args.latent}",
        f"trainer.max_epochs={args.epochs}",
        f"callbacks.early_stopping.patience={args.patience}",
        f"seed={seed}",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "logger=none",
    ]
    if batch_key:
        overrides.append(f"data.batch_key={batch_key}")
    if label_key:
        overrides.append(f"data.label_key={label_key}")
    train(compose(overrides, out_dir))
    return out_dir


def test_cells(run_dir: Path) -> np.ndarray:
    """Names of the run's held-out test cells."""
    split = pd.read_csv(run_dir / "split.csv")
    return split.loc[split["split"] == "test", "obs_name"].astype(str).to_numpy()


def score_latents(
    latents: dict[str, np.ndarray], obs: pd.DataFrame, batch_key: str, label_key: str | None, *, k: int
) -> dict:
    """scIB integration scores of each latent, on the same cells, with ``k`` neighbours."""
    batch = torch.as_tensor(pd.Categorical(obs[batch_key]).codes.astype(np.int64))
    labels = None
    if label_key:
        labels = torch.as_tensor(pd.Categorical(obs[label_key]).codes.astype(np.int64))
    return {who: integration_scores(torch.as_tensor(z), batch, labels, k=k) for who, z in latents.items()}


def ended(metrics: dict) -> str:
    """How an exprae run ended, shortly: early stopping or the epoch cap, after how many epochs, its best epoch."""
    how = "early stop" if str(metrics.get("stopped", "")).startswith("early stopping") else "cap"
    return f"{how} after {metrics.get('epochs_trained')} (best {metrics.get('best_epoch')})"


def check_held_out_levels(run_dir: Path, adata: ad.AnnData, batch_key: str) -> None:
    """Stop when the run's test cells lack a batch level: mixing scores would be undefined (NaN) for every method."""
    present = set(adata.obs.loc[test_cells(run_dir), batch_key].astype(str))
    missing = sorted(set(adata.obs[batch_key].astype(str)) - present)
    if missing:
        raise SystemExit(f"{run_dir}: no test cell of {batch_key} level(s) {missing}; iLISI needs every level")


def exprae_rows(runs: dict[str, Path], adata: ad.AnnData, batch_key: str, label_key: str | None, *, k: int) -> dict:
    """Test-cell scores of both exprae runs and of the covariate run's PCA and per-batch PCA baselines."""
    rows = {}
    for name, run_dir in runs.items():
        test = adata[test_cells(run_dir)].copy()
        model = exprae.load(run_dir, device="cpu")
        exprae.embed(model, test)
        run_metrics = json.loads((run_dir / "metrics.json").read_text())
        metrics = run_metrics["test"]
        latents = {name: test.obsm["X_exprae"]}
        cosine = {name: metrics["model"]["cosine"]}
        if model.batch_categories:  # the covariate run also carries both PCA baselines, fitted on the same cells
            x = model.transform(test).X
            x_ng = torch.as_tensor(x.toarray() if sp.issparse(x) else np.asarray(x))
            codes = torch.as_tensor(recode(test.obs, model.batch_categories, what="test cells")[:, 0])
            with torch.no_grad():
                base = model.baselines.latents(x_ng, codes)
            latents.update({"PCA": base["pca"].numpy(), "per-batch PCA": base["batch_pca"].numpy()})
            cosine.update({"PCA": metrics["pca"]["cosine"], "per-batch PCA": metrics["batch_pca"]["cosine"]})
        for who, scores in score_latents(latents, test.obs, batch_key, label_key, k=k).items():
            rows[who] = {"cosine": cosine[who], **scores}
        rows[name]["ended"] = ended(run_metrics)
    return rows


def scvi_row(
    adata: ad.AnnData, run_dir: Path, batch_key: str, label_key: str | None, *, seed: int, args: Any
) -> dict | None:
    """scVI with ``batch_key`` on the covariate run's training cells and genes; the same test-cell scores.

    scVI early-stops on the run's own validation cells (``external_indexing``: exprae's train/val split), so both
    methods stop on the same cells and neither sees a test cell before it is scored.
    """
    try:
        import scvi
    except ImportError:
        print('scvi-tools is not installed: pip install -e ".[bench]" "torch==2.13.0" (make batch-bench does)')
        return None
    model_ae = exprae.load(run_dir, device="cpu")
    genes = model_ae.var_names
    split = pd.read_csv(run_dir / "split.csv")
    names = {part: split.loc[split["split"] == part, "obs_name"].astype(str).to_numpy() for part in ("train", "val")}
    test = adata[test_cells(run_dir)].copy()
    scvi.settings.seed = seed
    fit_ad = adata[np.concatenate([names["train"], names["val"]]), genes].copy()
    scvi.model.SCVI.setup_anndata(fit_ad, batch_key=batch_key)
    vae = scvi.model.SCVI(fit_ad, n_latent=args.latent)
    n_train = len(names["train"])
    start = time.perf_counter()
    vae.train(
        max_epochs=args.scvi_epochs,
        accelerator="cpu",
        enable_progress_bar=False,
        early_stopping=True,
        early_stopping_patience=args.scvi_patience,
        datasplitter_kwargs={"external_indexing": [np.arange(n_train), np.arange(n_train, fit_ad.n_obs)]},
    )
    wall = time.perf_counter() - start
    elbo = vae.history["elbo_validation"]["elbo_validation"].to_numpy()
    epochs, best = len(elbo), int(np.argmin(elbo)) + 1
    test_ad = adata[test.obs_names, genes].copy()
    z = vae.get_latent_representation(test_ad)
    # exprae's input is log1p(counts x 1e4 / the cell's total over all genes) on the HVGs. The same map is applied
    # to scVI's posterior-predictive count draws at the cell's own depth and averaged (E[T(c)], as
    # scripts/scvi_side_by_side.py scores scVI), so scVI is scored in the space exprae reconstructs.
    scale_n = 1e4 / np.maximum(np.asarray(adata[test.obs_names].X.sum(1)).ravel(), 1)
    scale = torch.as_tensor(scale_n, dtype=torch.float32)
    expected = posterior_predictive_mean(
        vae, test_ad, lambda c_bg, rows: torch.log1p(c_bg * scale[rows, None]), n_samples=args.scvi_samples
    ).numpy()
    x_in = model_ae.transform(test).X
    x_in = x_in.toarray() if sp.issparse(x_in) else np.asarray(x_in)
    cosine = float(per_cell_metrics(torch.as_tensor(expected).float(), torch.as_tensor(x_in).float())["cosine"].mean())
    scores = score_latents({"scVI": z}, test.obs, batch_key, label_key, k=args.k)["scVI"]
    how = "early stop" if epochs < args.scvi_epochs else "cap"
    return {"cosine": cosine, **scores, "wall_s": wall, "ended": f"{how} after {epochs} (best {best})"}


def run_dataset(
    name: str, adata: ad.AnnData, batch_key: str, label_key: str | None, out: Path, *, seed: int, args: Any
) -> dict:
    """Every method on one dataset with one training seed; returns the rows of the table (method -> scores)."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.h5ad"
    adata.write_h5ad(data)
    runs, walls = {}, {}
    for method, key in (("exprae", None), ("exprae + batch_key", batch_key)):
        start = time.perf_counter()
        run_dir = folder / f"{method.replace(' + ', '_')}_seed{seed}"
        if args.reuse and (run_dir / "metrics.json").is_file():
            # A finished run of an earlier invocation: its training time from its own files (written at its
            # start and at its end), so a benchmark cut short can be completed without training again.
            walls[method] = (run_dir / "metrics.json").stat().st_mtime - (run_dir / "environment.json").stat().st_mtime
            runs[method] = run_dir
            continue
        runs[method] = train_exprae(data, run_dir, batch_key=key, label_key=label_key, seed=seed, args=args)
        walls[method] = time.perf_counter() - start
        check_held_out_levels(run_dir, adata, batch_key)
    rows = exprae_rows(runs, adata, batch_key, label_key, k=args.k)
    for method, wall in walls.items():
        rows[method]["wall_s"] = wall
    if not args.no_scvi:
        scvi = scvi_row(adata, runs["exprae + batch_key"], batch_key, label_key, seed=seed, args=args)
        if scvi is not None:
            rows["scVI + batch_key"] = scvi
    return rows


def summarise(by_seed: dict[int, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per method: each score's mean over the seeds (``<score>_sd``: their sd), how each seed ended, its rows."""
    methods = dict.fromkeys(method for rows in by_seed.values() for method in rows)
    summary = {}
    for method in methods:
        runs = {seed: rows[method] for seed, rows in by_seed.items() if method in rows}
        row: dict[str, Any] = {"seeds": runs}
        for score in (*SCORES, "wall_s"):
            values = np.array([r[score] for r in runs.values() if score in r], dtype=float)
            if len(values):
                row[score] = float(values.mean())
                row[f"{score}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        if any("ended" in r for r in runs.values()):
            row["ended"] = "; ".join(f"seed {seed}: {r['ended']}" for seed, r in runs.items() if "ended" in r)
        summary[method] = row
    return summary


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """A markdown table: one row per dataset and method, mean ± sd over the training seeds."""
    head = "| data | method | " + " | ".join(SCORES) + " | train wall s | how training ended |"
    lines = [head, "|" + " --- |" * (len(SCORES) + 4)]
    for dataset, rows in results.items():
        for method, row in rows.items():
            cells = [_mean_sd(row, s) for s in SCORES]
            wall = f"{row['wall_s']:.0f}" if "wall_s" in row else "(in the covariate run)"
            lines.append(f"| {dataset} | {method} | " + " | ".join(cells) + f" | {wall} | {row.get('ended', '–')} |")
    return "\n".join(lines)


def _mean_sd(row: dict[str, Any], score: str) -> str:
    """``mean ± sd`` over seeds (the mean alone for one seed), or a dash where the score is undefined."""
    if score not in row or not np.isfinite(row[score]):
        return "–"
    sd = row.get(f"{score}_sd", float("nan"))
    return f"{row[score]:.3f}" + (f" ± {sd:.3f}" if np.isfinite(sd) else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/batches"))
    parser.add_argument(
        "--seeds", default="0,1", help="training seeds of exprae and scVI, comma-separated (data.split_seed stays 0)"
    )
    parser.add_argument("--effect-seed", type=int, default=0, help="seed of the halves and the batch effect")
    parser.add_argument("--effect-sd", type=float, default=0.5, help="sd of log f_g, the gene-wise batch factor")
    parser.add_argument("--epochs", type=int, default=100, help="exprae's epoch cap (it early-stops before)")
    parser.add_argument("--patience", type=int, default=10, help="exprae's early-stopping patience (epochs)")
    parser.add_argument("--scvi-epochs", type=int, default=400, help="scVI's epoch cap (its heuristic's for 2k cells)")
    parser.add_argument("--scvi-patience", type=int, default=45, help="scVI's early-stopping patience (its default)")
    parser.add_argument("--scvi-samples", type=int, default=25, help="posterior-predictive draws per test cell")
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--n-top-genes", type=int, default=2000)
    parser.add_argument("--cells", type=int, default=None, help="subsample pbmc4k (smoke runs)")
    parser.add_argument("--datasets", default="pbmc4k,kang")
    parser.add_argument("--k", type=int, default=90, help="neighbours of the integration scores (scIB: 90)")
    parser.add_argument("--no-scvi", action="store_true", help="skip scVI even where it is installed")
    parser.add_argument("--reuse", action="store_true", help="score finished exprae runs under --out, not retrain")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    datasets = {
        "pbmc4k + batch effect": ("pbmc4k", "pbmc4k_semisynthetic", "batch", "cell_type"),
        "Kang ctrl/stim": ("kang", "kang", "condition", None),
    }
    wanted = args.datasets.split(",")
    by_seed: dict[str, dict[int, dict]] = {}
    # Seed by seed over both datasets: a run cut short still has a complete first seed.
    for seed in seeds:
        for title, (short, folder, batch_key, label_key) in datasets.items():
            if short not in wanted:
                continue
            if short == "pbmc4k":
                path = REALDATA / "pbmc4k_soupx.h5ad"
                adata = semisynthetic(path, seed=args.effect_seed, effect_sd=args.effect_sd, n_cells=args.cells)
            else:
                adata = ad.read_h5ad(REALDATA / "kang2018_pbmc_ifnb_2k.h5ad")
            rows = run_dataset(folder, adata, batch_key, label_key, args.out, seed=seed, args=args)
            by_seed.setdefault(title, {})[seed] = rows
            write_results(
                {t: summarise(s) for t, s in by_seed.items()}, args
            )  # after each, so a long run shows what it has
    return 0


def write_results(results: dict, args: Any) -> None:
    """``results.json`` (with the settings) and ``table.md`` under ``--out``; the table is printed too."""
    text = table(results)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "results.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2))
    (args.out / "table.md").write_text(text + "\n")
    print(f"\n{text}\n\nsettings: {settings}")


if __name__ == "__main__":
    sys.exit(main())
