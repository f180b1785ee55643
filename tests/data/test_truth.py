"""The expected preprocessed truth E[T(x) | truth] (exprae.data.truth): exact on small cases, seeded, and the
quantity the MCV score's expectation is minimised by."""

from __future__ import annotations

import hydra
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from exprae.constants import EXPECTED_TRUTH_KEY, MCV_TARGET_KEY, RATE_KEY, RATE_TRUTH_KEY, TRUTH_KEY
from exprae.data import Preprocessing
from exprae.data.datamodule import MCV_LAYERS
from exprae.data.datasets import synthetic_counts
from exprae.data.truth import expected_profile, expected_truths

GENES = pd.Index(["g0", "g1", "g2", "g3"])
MEAN_NG = np.array([[0.2, 1.0, 5.0, 20.0], [3.0, 0.05, 0.7, 2.0]])
THETA_G = np.array([2.0, 5.0, 0.5, np.inf])  # the last gene is Poisson (infinite dispersion parameter)


def _fitted(**settings) -> Preprocessing:
    pre = Preprocessing(**settings)
    pre.genes = list(GENES)
    if pre.normalize_total is not None:
        pre.library_genes = list(GENES)
    return pre


def _dense(m) -> np.ndarray:
    return np.asarray(m.toarray() if hasattr(m, "toarray") else m, dtype=np.float64)


def _pmf(mean: float, theta: float, k: np.ndarray) -> np.ndarray:
    if np.isinf(theta):
        return stats.poisson.pmf(k, mean)
    return stats.nbinom.pmf(k, theta, theta / (theta + mean))


def _exact_log1p_moments(dropout: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """E[log1p(x)] and sd(log1p(x)) per entry by summing the pmf (x ~ NB times a keep with 1 - dropout)."""
    k = np.arange(20_000)
    first, second = np.zeros_like(MEAN_NG), np.zeros_like(MEAN_NG)
    for (n, g), mean in np.ndenumerate(MEAN_NG):
        pmf = _pmf(mean, THETA_G[g], k)
        assert pmf.sum() == pytest.approx(1.0, abs=1e-9)  # the grid holds the whole distribution
        first[n, g] = (1 - dropout) * (pmf * np.log1p(k)).sum()
        second[n, g] = (1 - dropout) * (pmf * np.log1p(k) ** 2).sum()
    return first, np.sqrt(second - first**2)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_expected_log1p_of_nb_counts_matches_the_pmf_sum(dropout):
    """Without normalisation E[T(x)] = E[log1p(x)] has an exact value; the Monte Carlo lands within 4.5 of its
    standard errors of it (seeded, so this is one fixed draw), and reports that standard error correctly."""
    n_samples = 2000
    exact, sd = _exact_log1p_moments(dropout)
    got = expected_profile(
        MEAN_NG, THETA_G, _fitted(log1p=True), var_names=GENES, dropout=dropout, n_samples=n_samples, seed=3
    )
    se = sd / np.sqrt(n_samples)
    assert np.all(np.abs(got.mean_ng - exact) <= 4.5 * se + 1e-6)
    np.testing.assert_allclose(got.sem_ng, se, rtol=0.2)


def test_normalised_expectation_uses_each_draws_own_total_and_the_scaling():
    """With normalize_total each draw is divided by its own total: E[(log1p(10 x_g / Σx) - m_g) / s_g] summed over
    the joint pmf of two independent Poisson genes (an all-zero draw stays 0, as scanpy leaves it)."""
    mean_g, target = np.array([3.0, 7.0]), 10.0
    genes = pd.Index(["a", "b"])
    pre = Preprocessing(normalize_total=target, log1p=True, scale=True)
    pre.genes, pre.library_genes = list(genes), list(genes)
    pre.scale_mean, pre.scale_std = [0.5, 1.0], [2.0, 0.5]
    k = np.arange(80)
    joint = np.outer(stats.poisson.pmf(k, mean_g[0]), stats.poisson.pmf(k, mean_g[1]))
    total = k[:, None] + k[None, :]
    share = np.divide(k[:, None] * np.ones_like(total), total, out=np.zeros(total.shape), where=total > 0)
    e_a = (joint * np.log1p(target * share)).sum()
    e_b = (joint * np.log1p(target * np.where(total > 0, 1 - share, 0.0))).sum()
    exact = (np.array([e_a, e_b]) - pre.scale_mean) / pre.scale_std
    got = expected_profile(mean_g[None, :], np.array([np.inf, np.inf]), pre, var_names=genes, n_samples=4000)
    assert np.all(np.abs(got.mean_ng[0] - exact) <= 4.5 * got.sem_ng[0])
    # Not the plain truth T(E[x]): that lies 6 to 12 standard errors away here.
    plain = (np.log1p(target * mean_g / mean_g.sum()) - pre.scale_mean) / pre.scale_std
    assert np.all(np.abs(got.mean_ng[0] - plain) > 5 * got.sem_ng[0])


def test_the_same_seed_gives_the_same_profile_and_another_seed_another():
    pre = _fitted(log1p=True)
    first = expected_profile(MEAN_NG, THETA_G, pre, var_names=GENES, n_samples=16, seed=7)
    again = expected_profile(MEAN_NG, THETA_G, pre, var_names=GENES, n_samples=16, seed=7)
    other = expected_profile(MEAN_NG, THETA_G, pre, var_names=GENES, n_samples=16, seed=8)
    np.testing.assert_array_equal(first.mean_ng, again.mean_ng)
    assert not np.array_equal(first.mean_ng, other.mean_ng)


def test_jensen_puts_the_expected_log1p_below_the_log1p_of_the_mean():
    """log1p is concave: E[log1p(x)] < log1p(E[x]) for every entry, exactly (pmf sums) and sampled; the gap
    grows with the dispersion (NB with theta 0.5 at mean 5: 0.6) and shrinks for Poisson genes and tiny means."""
    exact, _ = _exact_log1p_moments()
    assert np.all(exact < np.log1p(MEAN_NG))
    got = expected_profile(MEAN_NG, THETA_G, _fitted(log1p=True), var_names=GENES, n_samples=2000)
    assert np.all(got.mean_ng < np.log1p(MEAN_NG))
    assert np.log1p(5.0) - got.mean_ng[0, 2] > 0.5 and np.log1p(20.0) - got.mean_ng[0, 3] < 0.05


def test_expected_truths_read_the_generators_parameters_and_fill_only_the_asked_rows():
    adata = synthetic_counts(30, 12, seed=1)
    pre = _fitted(log1p=True)
    pre.genes = list(adata.var_names)
    rows = np.array([2, 5, 11])
    got = expected_truths(adata, pre, rows=rows, depth=0.5, n_samples=8, seed=4)
    assert set(got) == {EXPECTED_TRUTH_KEY, RATE_TRUTH_KEY}
    for key, layer, theta_g in [
        (EXPECTED_TRUTH_KEY, TRUTH_KEY, adata.var["true_dispersion"].to_numpy()),
        (RATE_TRUTH_KEY, RATE_KEY, np.full(12, np.inf)),  # given the rate the counts are Poisson
    ]:
        direct = expected_profile(
            0.5 * np.asarray(adata.layers[layer][rows], dtype=np.float64),
            theta_g,
            pre,
            var_names=adata.var_names,
            n_samples=8,
            seed=4,
        )
        np.testing.assert_array_equal(got[key][rows], direct.mean_ng)
        assert np.isnan(got[key][np.setdiff1d(np.arange(30), rows)]).all()
    del adata.var["true_dispersion"], adata.layers[RATE_KEY]  # nothing left to sample from
    assert expected_truths(adata, pre) == {}


def test_the_generator_keeps_the_rate_its_counts_were_drawn_from():
    """Given the kept rate the counts are Poisson (standardised squared residual 1); given the NB mean they are
    overdispersed (1 + mean / theta: 18 on average here, where many means are far above theta ~5)."""
    adata = synthetic_counts(200, 50, seed=0)
    rate_ng, mean_ng = adata.layers[RATE_KEY], adata.layers[TRUTH_KEY]
    assert rate_ng.shape == (200, 50) and (rate_ng >= 0).all()
    counts_ng = adata.X.toarray()
    scored = rate_ng > 1  # a Poisson's (x - λ)² / λ has variance 2 + 1 / λ: tiny rates would dominate the mean
    z2_rate = ((counts_ng - rate_ng) ** 2 / rate_ng)[scored]
    assert z2_rate.mean() == pytest.approx(1.0, abs=0.1)  # ~9,000 entries: sd of the mean ~0.015
    z2_mean = ((counts_ng - mean_ng) ** 2 / mean_ng)[mean_ng > 1]
    assert z2_mean.mean() > 2.0


@pytest.fixture(scope="module")
def mcv_layers(tmp_path_factory):
    """The datamodule's own synthetic MCV data: the held-out T(x'') and the three truths on the scored cells."""
    from exprae.train import compose

    cfg = compose(
        ["data=synthetic", "data.synthetic.n_cells=400", "data.synthetic.n_genes=150", "data.mcv.fraction=0.5"],
        tmp_path_factory.mktemp("truth"),
    )
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup()
    held = np.concatenate([dm.splits["val"], dm.splits["test"]])
    keys = {
        "target": MCV_LAYERS[MCV_TARGET_KEY],
        "plain": TRUTH_KEY,
        "mean": EXPECTED_TRUTH_KEY,
        "rate": RATE_TRUTH_KEY,
    }
    layers = {name: _dense(dm.adata.layers[key][held]) for name, key in keys.items()}
    assert np.isnan(dm.adata.layers[EXPECTED_TRUTH_KEY][dm.splits["train"]]).all()  # sampled for scored cells only
    return dm, layers


def test_the_datamodule_samples_the_held_out_half_through_its_fitted_preprocessing(mcv_layers):
    """Under MCV the truths are of x'', drawn at (1 - p) times the mean or rate, through the run's preprocessing."""
    dm, layers = mcv_layers
    held = np.concatenate([dm.splits["val"], dm.splits["test"]])
    direct = expected_truths(dm.load_raw(), dm.preprocess, rows=held, depth=0.5)
    np.testing.assert_array_equal(layers["mean"], direct[EXPECTED_TRUTH_KEY][held])
    np.testing.assert_array_equal(layers["rate"], direct[RATE_TRUTH_KEY][held])


def _mcv_gain(layers: dict[str, np.ndarray], worse: str, better: str) -> np.ndarray:
    """Per cell, the MCV score (MSE to the held-out T(x'')) of predicting ``worse`` minus that of ``better``."""
    target = layers["target"]
    return ((layers[worse] - target) ** 2).mean(1) - ((layers[better] - target) ** 2).mean(1)


@pytest.mark.parametrize(("worse", "better"), [("plain", "mean"), ("mean", "rate")])
def test_the_truth_mcv_measures_scores_best_under_mcv(mcv_layers, worse, better):
    """The perfect predictor of E[T(x'')] has a lower MCV score than the plain truth T(E[x'']); and given each
    entry's Poisson rate (which x' and x'' share) lower still: MCV's expectation is minimised by E[T(x'') | λ]."""
    gain_n = _mcv_gain(mcv_layers[1], worse, better)
    # Per cell the noise of T(x'') dominates; the mean gain is positive by several of its standard errors.
    assert gain_n.mean() > 4 * gain_n.std(ddof=1) / np.sqrt(len(gain_n))
