"""Paired differences between variants: against scipy's tests on hand data, and by coverage
on simulated paired data (the interval covers the true difference as often as it says)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from analysis.paired import PAIRED, WELCH, paired_difference, welch_interval


def test_paired_interval_equals_scipys_paired_t_test():
    a = {0: 69.6, 1: 70.1, 2: 69.2, 3: 70.4, 4: 69.9}
    b = {0: 64.4, 1: 64.1, 2: 64.9, 3: 64.0, 4: 64.6}
    got = paired_difference(a, b, 0.95)
    ref = stats.ttest_rel(list(a.values()), list(b.values())).confidence_interval(0.95)
    assert got["method"] == PAIRED and got["n"] == 5
    assert got["mean"] == pytest.approx(np.mean([a[k] - b[k] for k in a]), abs=1e-12)
    assert (got["lo"], got["hi"]) == pytest.approx((ref.low, ref.high), abs=1e-12)
    # the same runs unpaired, for what pairing buys: Welch's interval as scipy computes it
    unpaired = stats.ttest_ind(list(a.values()), list(b.values()), equal_var=False).confidence_interval(0.95)
    assert (got["welch_lo"], got["welch_hi"]) == pytest.approx((unpaired.low, unpaired.high), abs=1e-12)


def test_pairs_are_matched_by_seed_not_by_order():
    a = {2: 3.0, 0: 1.0, 1: 2.0}
    b = {0: 0.5, 1: 1.5, 2: 2.5}
    got = paired_difference(a, b)
    assert got["mean"] == pytest.approx(0.5) and got["lo"] == got["hi"] == pytest.approx(0.5)


def test_unpaired_runs_fall_back_to_welch_as_scipy_computes_it():
    a = {0: 1.0, 1: 2.5, 2: 2.0, 3: 4.0}
    b = {0: 0.2, 1: 0.1, 5: 0.9}
    got = paired_difference(a, b, 0.9)
    ref = stats.ttest_ind(list(a.values()), list(b.values()), equal_var=False).confidence_interval(0.9)
    assert got["method"] == WELCH and (got["n_a"], got["n_b"]) == (4, 3)
    assert (got["lo"], got["hi"]) == pytest.approx((ref.low, ref.high), abs=1e-12)


def test_non_finite_runs_are_dropped_and_one_pair_has_no_width():
    got = paired_difference({0: 2.0, 1: float("nan")}, {0: 1.0})
    assert got["method"] == PAIRED and got["n"] == 1 and got["lo"] == got["hi"] == 1.0
    assert np.isnan(welch_interval(np.array([1.0]), np.array([1.0, 2.0]))[1])


@pytest.mark.parametrize("method", [PAIRED, WELCH])
def test_interval_covers_the_true_difference_at_its_level(method):
    """2,000 simulated studies of 5 seeds, a seed effect 10x the noise: shared by both variants
    where they are paired, drawn anew for unpaired runs (what Welch's interval assumes)."""
    rng = np.random.default_rng(0)
    hits, n_sim = 0, 2000
    for _ in range(n_sim):
        seed_effect = rng.normal(0, 1.0, 5)
        a = 0.3 + seed_effect + rng.normal(0, 0.1, 5)
        if method == WELCH:
            seed_effect = rng.normal(0, 1.0, 5)
        b = seed_effect + rng.normal(0, 0.1, 5)
        keys_b = range(5) if method == PAIRED else range(10, 15)
        got = paired_difference(dict(enumerate(a)), dict(zip(keys_b, b, strict=True)), 0.9)
        assert got["method"] == method
        hits += got["lo"] <= 0.3 <= got["hi"]
    # binomial sd of the coverage at 0.9 over 2,000 studies is 0.0067: 4 sd either side
    assert abs(hits / n_sim - 0.9) < 0.027, hits / n_sim


def test_pairing_narrows_the_interval_when_seeds_share_an_effect():
    rng = np.random.default_rng(1)
    seed_effect = rng.normal(0, 1.0, 5)
    a, b = dict(enumerate(1 + seed_effect + rng.normal(0, 0.1, 5))), dict(enumerate(seed_effect))
    paired = paired_difference(a, b)
    welch = welch_interval(np.array(list(a.values())), np.array(list(b.values())))
    assert (paired["hi"] - paired["lo"]) < 0.5 * (welch[2] - welch[1])
