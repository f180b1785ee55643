"""The batch benchmark (scripts/batch_benchmark.py): its batch effect, and its answer at a reduced size."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "batch_benchmark.py"


def _script():
    spec = importlib.util.spec_from_file_location("batch_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_semisynthetic_batch_effect_is_seeded_gene_wise_and_keeps_labels(realdata):
    path = realdata("pbmc4k_soupx.h5ad")
    bench = _script()
    a = bench.semisynthetic(path, seed=0, effect_sd=0.5, n_cells=400)
    again = bench.semisynthetic(path, seed=0, effect_sd=0.5, n_cells=400)
    other = bench.semisynthetic(path, seed=1, effect_sd=0.5, n_cells=400)
    assert (a.X != again.X).nnz == 0
    assert (a.X != other.X).nnz > 0  # another seed: other cells, another effect
    assert a.obs["batch"].value_counts().to_dict() == {"A": 200, "B": 200}
    assert a.obs["cell_type"].notna().all() and (a.X.data == np.round(a.X.data)).all()
    # Batch A is the data as it was; B's gene totals move by a gene-wise factor (log sd ~ 0.5 on busy genes).
    import anndata as ad

    original = ad.read_h5ad(path)[a.obs_names]
    in_a = (a.obs["batch"] == "A").to_numpy()
    assert (a.X[in_a] != original.X[in_a]).nnz == 0
    b_tot = np.asarray(a.X[~in_a].sum(0)).ravel()
    o_tot = np.asarray(original.X[~in_a].sum(0)).ravel()
    busy = o_tot > 200
    assert 0.35 < np.log(b_tot[busy] / o_tot[busy]).std() < 0.65
    # The halves are drawn apart from exprae's split (default_rng(split_seed).permutation): with both seeds 0
    # they once coincided, and every held-out cell of the full data was in B.
    full = bench.semisynthetic(path, seed=0, effect_sd=0.5)
    held_out = np.random.default_rng(0).permutation(full.n_obs)[: full.n_obs // 5]
    assert full.obs["batch"].iloc[held_out].value_counts().min() > full.n_obs // 20


@pytest.mark.slow
def test_the_benchmark_scores_every_method_on_the_same_test_cells(realdata, tmp_path):
    """At a reduced size (800 cells, 500 HVGs, 3 epochs, log sd 1.0) every method gets a full row of scores.

    It does not assert which method mixes the batches better. Measured once the halves were drawn apart from
    exprae's split (seed 0): iLISI 0.395 without the covariate, 0.319 with it, PCA 0.413, per-batch PCA 0.330;
    at 2,170 cells (2 epochs, k = 30) 0.516 / 0.182 / 0.519 / 0.176, so on these sparse counts the per-batch-centred
    start separates the halves more than plain PCA does (docs/batches.md, still under investigation in issue 20).
    """
    realdata("pbmc4k_soupx.h5ad")
    bench = _script()
    argv = ["--out", str(tmp_path), "--epochs", "3", "--cells", "800", "--n-top-genes", "500", "--latent", "8"]
    argv += ["--effect-sd", "1.0", "--k", "15", "--no-scvi", "--datasets", "pbmc4k", "--seeds", "0"]
    assert bench.main(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["results"]["pbmc4k + batch effect"]
    assert set(rows) == {"exprae", "exprae + batch_key", "PCA", "per-batch PCA"}
    for method, scores in rows.items():
        for name in ("ilisi", "clisi", "silhouette_label", "silhouette_batch"):
            assert 0.0 <= scores[name] <= 1.0, (method, name, scores[name])
        # Measured 0.544-0.552 for the four (test cosine in the input space); the bound catches a broken reconstruction.
        assert scores["cosine"] > 0.5, (method, scores["cosine"])
    assert rows["exprae + batch_key"]["ilisi"] != rows["exprae"]["ilisi"]  # the covariate reached the latent
    assert (tmp_path / "table.md").read_text().count("| pbmc4k + batch effect |") == 4
