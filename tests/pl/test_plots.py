"""exprae.pl on pbmc68k embedded by a real run: each plot draws the cells it says it draws."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

import exprae

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MARKERS = ["CD79A", "MS4A1", "NKG7", "GNLY", "CST3", "LYZ"]


@pytest.fixture(scope="module")
def embedded(pbmc_run, pbmc):
    return exprae.embed(exprae.load(pbmc_run, device="cpu"), pbmc, baselines=True, copy=True)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_cosine_distribution_draws_the_held_out_cells_of_each_scorer(embedded, tmp_path):
    ax = exprae.pl.cosine_distribution(embedded, save=tmp_path / "hist.png")
    assert (tmp_path / "hist.png").read_bytes()[:8] == PNG_MAGIC
    assert "140 held-out cells (val+test)" in ax.get_title()
    # One outline per scorer, each over the held-out cells: its legend quotes their median.
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    held = embedded.obs["exprae_split"].isin(["val", "test"]).to_numpy()
    for label, column in zip(labels, ("exprae_cosine", "exprae_pca_cosine", "exprae_meanprofile_cosine"), strict=True):
        assert f"(median {np.median(embedded.obs[column][held]):.3f})" in label
    everyone = exprae.pl.cosine_distribution(embedded, cells="all")
    assert "all 700 cells (training cells included)" in everyone.get_title()


def test_cosine_by_group_labels_each_group_with_its_count(embedded):
    ax = exprae.pl.cosine_by_group(embedded, "bulk_labels")
    held = embedded.obs[embedded.obs["exprae_split"].isin(["val", "test"])]
    expected = held["bulk_labels"].value_counts()
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    for group, n in expected[expected > 0].items():
        assert f"{group} (n={n})" in ticks
    assert len(ticks) == (expected > 0).sum()


def test_best_median_worst_picks_by_cosine(embedded):
    axes = exprae.pl.best_median_worst(embedded)
    held = embedded.obs[embedded.obs["exprae_split"].isin(["val", "test"])]["exprae_cosine"]
    assert f"cosine {held.max():.3f}" in axes[0].get_title() and f"cosine {held.min():.3f}" in axes[2].get_title()


def test_gene_r_vs_mean_states_which_cells_the_r_covers(embedded):
    ax = exprae.pl.gene_r_vs_mean(embedded, use_raw=True)
    assert "140 cells not in the run's training set" in ax.get_title()
    n_points = len(ax.collections[0].get_offsets())
    assert n_points == embedded.var["exprae_gene_r"].notna().sum()


def test_marker_genes_shows_group_means_of_input_and_reconstruction(embedded):
    axes = exprae.pl.marker_genes(embedded, MARKERS, "bulk_labels")
    held = embedded[embedded.obs["exprae_split"].isin(["val", "test"]).to_numpy()]
    b_cells = held[held.obs["bulk_labels"] == "CD19+ B"]
    order = sorted(held.obs["bulk_labels"].astype(str).unique())
    row = order.index("CD19+ B")
    shown_input = axes[0].images[0].get_array()[row]
    np.testing.assert_allclose(shown_input, np.asarray(b_cells[:, MARKERS].X).mean(axis=0), rtol=1e-5)
    shown_recon = axes[1].images[0].get_array()[row]
    np.testing.assert_allclose(shown_recon, b_cells[:, MARKERS].layers["exprae_recon"].mean(axis=0), rtol=1e-5)
    with pytest.raises(KeyError, match="not among the model's reconstructed genes"):
        exprae.pl.marker_genes(embedded, ["NOT_A_GENE"], "bulk_labels")


def test_an_adata_without_embed_keys_is_a_clear_error(pbmc):
    with pytest.raises(KeyError, match=r"run exprae\.embed"):
        exprae.pl.cosine_distribution(pbmc)


def test_dir_exprae_shows_the_public_api():
    assert {"load", "embed", "pl"} <= set(dir(exprae))


def test_model_input_is_dense_when_the_model_returns_sparse_rows(pbmc):
    """A run that log-normalises without scaling gives sparse model input; plots need it dense."""
    import scipy.sparse as sp

    from exprae.pl.plots import model_input

    class SparseTransform:  # the one method model_input uses: ExpraeModel.transform
        def transform(self, adata):
            out = adata.copy()
            out.X = sp.csr_matrix(np.asarray(adata.X))
            return out

    dense = model_input(pbmc, MARKERS, model=SparseTransform())
    assert isinstance(dense, np.ndarray) and dense.shape == (pbmc.n_obs, len(MARKERS))
    np.testing.assert_allclose(dense, np.asarray(pbmc[:, MARKERS].X))
