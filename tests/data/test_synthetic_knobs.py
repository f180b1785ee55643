"""The synthetic generator's knobs (issue 22 part 6): each does what it says, and the defaults draw what they did."""

from __future__ import annotations

import inspect

import anndata as ad
import numpy as np
import pytest

from exprae.constants import TRUE_LATENT_KEY
from exprae.data.datasets import synthetic_counts
from exprae.errors import ConfigError


def _proportions(adata: ad.AnnData) -> np.ndarray:
    """Each cell's true gene proportions: the NB mean over the cell's true library size."""
    return np.asarray(adata.layers["true_mean"], dtype=np.float64) / adata.obs["true_library_size"].to_numpy()[:, None]


# Measured on the generator before n_uninformative, library_state and obsm["X_true"] existed (300 cells x 120
# genes): total count, non-zero entries and the sum of the NB means. Any change to the draws moves them.
BEFORE = [
    ({}, 1076344, 25952, 1063254.918675887),
    ({"structure": "nonlinear", "library_spread": 1.0, "seed": 3}, 1466369, 29381, 1460794.6169714967),
    ({"dropout": 0.2, "seed": 7, "n_types": 3}, 818331, 20937, 1010737.7722055069),
]


@pytest.mark.parametrize(("kwargs", "total", "nonzero", "mean_sum"), BEFORE, ids=["default", "nonlinear", "dropout"])
def test_the_defaults_draw_the_same_counts_as_before_the_new_knobs(kwargs, total, nonzero, mean_sum):
    adata = synthetic_counts(300, 120, **kwargs)
    counts = adata.X.toarray()
    assert int(counts.sum()) == total and int((counts > 0).sum()) == nonzero
    assert float(np.asarray(adata.layers["true_mean"], dtype=np.float64).sum()) == pytest.approx(mean_sum, rel=1e-9)
    explicit = synthetic_counts(300, 120, n_uninformative=0, library_state=0.0, **kwargs)
    assert (explicit.X != adata.X).nnz == 0


def test_uninformative_genes_have_the_same_proportion_in_every_cell():
    adata = synthetic_counts(400, 60, n_uninformative=15, seed=2)
    rho_ng = _proportions(adata)
    np.testing.assert_allclose(rho_ng.sum(axis=1), 1.0, rtol=1e-5)
    informative = adata.var["informative"].to_numpy()
    assert informative.sum() == 45 and not informative[45:].any()  # the last 15 genes
    # The same share in every cell (float32 rounding only), while each informative gene varies across cells.
    spread_g = rho_ng.std(axis=0) / rho_ng.mean(axis=0)
    assert spread_g[~informative].max() < 1e-5
    assert spread_g[informative].min() > 0.1
    # So their counts carry no cell state: per cell type, their mean proportion of the counts agrees.
    counts = adata.X.toarray()
    share_n = counts[:, ~informative].sum(axis=1) / counts.sum(axis=1)
    by_type = [share_n[adata.obs["cell_type"].to_numpy() == t].mean() for t in adata.obs["cell_type"].unique()]
    assert np.ptp(by_type) < 0.1 * np.mean(by_type)


@pytest.mark.parametrize("r", [0.3, -0.6, 0.0])
def test_log_library_size_correlates_with_the_state_as_asked(r):
    adata = synthetic_counts(20000, 20, library_state=r, library_mean=200.0, library_spread=0.5, seed=4)
    log_library_n = np.log(adata.obs["true_library_size"].to_numpy())
    state_n = adata.obsm[TRUE_LATENT_KEY][:, 0]
    # Standard error of a sample correlation on 20,000 cells is (1 - r^2) / sqrt(n) <= 0.007: 0.03 is > 4 of it.
    assert np.corrcoef(log_library_n, state_n)[0, 1] == pytest.approx(r, abs=0.03)
    assert log_library_n.std() == pytest.approx(0.5, rel=0.03)  # the spread is the sd whatever the correlation
    assert np.exp(np.median(log_library_n)) == pytest.approx(200.0, rel=0.03)


def test_the_true_latent_is_stored_and_the_means_are_a_function_of_it():
    adata = synthetic_counts(300, 80, n_programs=6, library_state=1.0, library_spread=0.4, seed=1)
    u_np = adata.obsm[TRUE_LATENT_KEY]
    assert u_np.shape == (300, 6)
    # Linear structure: the centred log proportions are an affine map of the latent, exactly (float32 means).
    log_rho_ng = np.log(_proportions(adata))
    clr_ng = log_rho_ng - log_rho_ng.mean(axis=1, keepdims=True)
    design = np.column_stack([u_np, np.ones(len(u_np))])

    def residual(design_np: np.ndarray) -> float:
        coef, *_ = np.linalg.lstsq(design_np, clr_ng, rcond=None)
        return float(np.abs(design_np @ coef - clr_ng).max() / np.abs(clr_ng).max())

    assert residual(design) < 1e-5
    assert residual(design[np.random.default_rng(0).permutation(300)]) > 0.3  # another cell's latent does not fit
    # library_state=1: the log library is the first program, standardised, times the spread.
    z_n = (u_np[:, 0] - u_np[:, 0].mean()) / u_np[:, 0].std()
    np.testing.assert_allclose(np.log(adata.obs["true_library_size"]), np.log(3000.0) + 0.4 * z_n, rtol=1e-10)


def test_every_setting_is_recorded_and_survives_h5ad(tmp_path):
    settings = {"n_programs": 5, "library_mean": 80.0, "n_uninformative": 7, "library_state": 0.25, "seed": 9}
    adata = synthetic_counts(50, 30, structure="nonlinear", **settings)
    recorded = adata.uns["synthetic"]
    parameters = set(inspect.signature(synthetic_counts).parameters)
    assert parameters <= set(recorded), parameters - set(recorded)
    assert {k: recorded[k] for k in settings} == settings and recorded["structure"] == "nonlinear"
    adata.write_h5ad(tmp_path / "s.h5ad")
    back = ad.read_h5ad(tmp_path / "s.h5ad")
    assert back.uns["synthetic"]["library_state"] == 0.25
    np.testing.assert_array_equal(back.obsm[TRUE_LATENT_KEY], adata.obsm[TRUE_LATENT_KEY])


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"n_uninformative": 30}, "n_uninformative"),
        ({"n_uninformative": -1}, "n_uninformative"),
        ({"library_state": 1.5}, "library_state"),
        ({"library_mean": 0.0}, "library_mean"),
        ({"n_programs": 0}, "programs"),
    ],
)
def test_bad_settings_are_refused_by_name(kwargs, named):
    with pytest.raises(ConfigError, match=named):
        synthetic_counts(20, 30, **kwargs)


def test_depth_and_programs_are_reachable_from_the_config(compose_cfg):
    """data.synthetic.* reaches the generator: the sparse depth the grid uses gives real data's zero fraction."""
    from exprae.train import build

    overrides = ["data.synthetic.n_cells=300", "data.synthetic.n_genes=500", "data.synthetic.library_mean=50"]
    cfg = compose_cfg("data=synthetic", *overrides, "data.synthetic.n_programs=4", "data.synthetic.n_uninformative=50")
    datamodule, _ = build(cfg)
    generated = datamodule.load_raw()
    recorded = generated.uns["synthetic"]
    assert recorded["n_programs"] == 4 and recorded["library_mean"] == 50.0 and recorded["n_uninformative"] == 50
    assert generated.obsm[TRUE_LATENT_KEY].shape == (300, 4)
    assert (generated.X.toarray() == 0).mean() > 0.9
