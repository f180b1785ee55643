"""The paired per-cell bootstrap, checked against hand computations on tiny cases."""

from __future__ import annotations

import numpy as np
import pytest

from exprae.report.paired import paired_bootstrap


def test_two_cells_reproduce_the_exact_bootstrap_distribution():
    # Differences a − b = [0, 1]. Resampling 2 cells gives means 0, 0.5, 1 with probability 1/4, 1/2, 1/4.
    a, b = np.array([1.0, 3.0]), np.array([1.0, 2.0])
    result = paired_bootstrap([(a, b, "split0")], n_boot=20000, seed=1)
    mean = result.intervals["mean"]
    assert mean.estimate == pytest.approx(0.5)
    assert (mean.low, mean.high) == (0.0, 1.0)  # the 2.5 % and 97.5 % points of that distribution
    reps = result.replicates["mean"]
    for value, probability in ((0.0, 0.25), (0.5, 0.5), (1.0, 0.25)):
        assert np.mean(np.isclose(reps, value)) == pytest.approx(probability, abs=0.015)
    # Median and p10 are differences of each setting's statistic, not statistics of the differences.
    assert result.intervals["median"].estimate == pytest.approx(np.median(a) - np.median(b))  # 2.0 − 1.5
    assert result.intervals["p10"].estimate == pytest.approx(np.quantile(a, 0.1) - np.quantile(b, 0.1))


def test_a_constant_shift_has_a_zero_width_interval():
    b = np.random.default_rng(0).normal(0.4, 0.1, size=50)
    result = paired_bootstrap([(b + 0.01, b, "s")], n_boot=500)
    for name in ("mean", "median", "p10"):
        interval = result.intervals[name]
        assert interval.estimate == pytest.approx(0.01)
        assert interval.low == pytest.approx(0.01) and interval.high == pytest.approx(0.01)


def test_pairing_finds_a_small_shift_that_the_cell_spread_would_hide():
    rng = np.random.default_rng(0)
    b = rng.normal(0.4, 0.15, size=300)  # cells differ a lot from each other ...
    a = b + 0.004 + rng.normal(0, 0.002, size=300)  # ... but a beats b on nearly every cell
    mean = paired_bootstrap([(a, b, "s")], n_boot=1000).intervals["mean"]
    # The shift is 0.004 with noise sd 0.002 / sqrt(300) = 0.00012 on its mean: the 2.5 % point sits near
    # 0.004 - 2 x 0.00012 (measured 0.00375); 0.003 is 8 sd below the shift, an unpaired interval reaches below 0.
    assert mean.excludes_zero and mean.low > 0.003
    # Unpaired, the same means would be indistinguishable: the sd of a mean of 300 cells is ~0.009.
    assert b.std() / np.sqrt(len(b)) > 2 * 0.004


def test_seeds_are_resampled_too():
    # Two seeds on the same cells: one shows +0.1 on every cell, the other −0.1; only the seed level varies.
    b = np.full(20, 0.5)
    result = paired_bootstrap([(b + 0.1, b, "s"), (b - 0.1, b, "s")], n_boot=4000, seed=0)
    mean = result.intervals["mean"]
    assert mean.estimate == pytest.approx(0.0, abs=1e-12)
    # Resampling 2 seeds: (+,+) 1/4 -> +0.1, mixed 1/2 -> 0, (−,−) 1/4 -> −0.1.
    assert mean.low == pytest.approx(-0.1) and mean.high == pytest.approx(0.1)
    assert np.mean(np.isclose(result.replicates["mean"], 0.0)) == pytest.approx(0.5, abs=0.03)
    assert result.n_pairs == 2 and result.n_cells == 20


def test_mismatched_pairs_are_refused():
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap([(np.ones(3), np.ones(4), "s")])
    with pytest.raises(ValueError, match="no paired runs"):
        paired_bootstrap([])
