"""Confidence bands across seeds, checked against scipy, simulation and exact bootstrap enumeration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import bands

HAND = np.array([0.61, 0.64, 0.58, 0.66, 0.62])


def long_frame(groups: dict[tuple[str, int], list[float]]) -> pd.DataFrame:
    rows = [
        {"variant": v, "x": x, "seed": i, "value": value}
        for (v, x), values in groups.items()
        for i, value in enumerate(values)
    ]
    return pd.DataFrame(rows)


def test_t_interval_equals_scipy_on_hand_data():
    for level in (0.9, 0.95, 0.99):
        mean, lo, hi = bands.t_interval(HAND, level)
        ref = stats.t.interval(level, len(HAND) - 1, loc=HAND.mean(), scale=stats.sem(HAND))
        assert mean == pytest.approx(HAND.mean())
        assert (lo, hi) == pytest.approx(ref, rel=1e-12)


def test_grouped_t_interval_equals_scipy_per_group():
    data = {("BN", 1): list(HAND), ("BN", 2): [1.0, 2.0, 4.0], ("no BN", 1): [3.0, 3.5]}
    est = bands.get_interval_estimates(long_frame(data), ["variant"], "x")
    assert len(est) == 3
    for row in est.itertuples():
        values = np.array(data[(row.variant, row.x)])
        ref = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
        assert row.n == len(values)
        assert row.mean == pytest.approx(values.mean())
        assert (row.lo, row.hi) == pytest.approx(ref, rel=1e-12)


def test_t_interval_coverage_near_nominal_on_normal_data():
    rng = np.random.default_rng(12345)
    sims, n, mu = 2000, 5, 3.0
    values = rng.normal(mu, 2.0, size=(sims, n))
    frame = pd.DataFrame({"sim": np.repeat(np.arange(sims), n), "x": 0, "value": values.ravel()})
    est = bands.get_interval_estimates(frame, ["sim"], "x", confidence_interval_size=0.95)
    coverage = float(((est["lo"] <= mu) & (mu <= est["hi"])).mean())
    assert abs(coverage - 0.95) < 0.03
    est90 = bands.get_interval_estimates(frame, ["sim"], "x", confidence_interval_size=0.9)
    coverage90 = float(((est90["lo"] <= mu) & (mu <= est90["hi"])).mean())
    assert abs(coverage90 - 0.90) < 0.03


def test_bootstrap_interval_is_sensible_and_seeded():
    frame = long_frame({("BN", 1): list(HAND), ("BN", 2): [1.0, 2.0, 4.0, 3.0]})
    est = bands.get_interval_estimates(frame, ["variant"], "x", method="bootstrap", reps=3000)
    again = bands.get_interval_estimates(frame, ["variant"], "x", method="bootstrap", reps=3000)
    pd.testing.assert_frame_equal(est, again)
    t_est = bands.get_interval_estimates(frame, ["variant"], "x")
    for row, t_row in zip(est.itertuples(), t_est.itertuples(), strict=True):
        values = frame.loc[frame["x"] == row.x, "value"].to_numpy()
        assert row.lo < row.mean < row.hi
        assert values.min() <= row.lo and row.hi <= values.max()
        # The percentile bootstrap of a few seeds is narrower than the t-interval.
        assert row.hi - row.lo < t_row.hi - t_row.lo


def test_single_seed_gives_mean_and_no_nan_and_empty_group_is_omitted():
    frame = long_frame({("BN", 1): [0.7], ("BN", 2): [0.5, 0.6], ("no BN", 1): [np.nan]})
    for method in bands.METHODS:
        est = bands.get_interval_estimates(frame, ["variant"], "x", method=method)
        assert len(est) == 2  # the all-NaN group (n = 0) has no row
        one = est[est["x"] == 1].iloc[0]
        assert one["n"] == 1 and one["mean"] == one["lo"] == one["hi"] == 0.7
        assert not est[["mean", "lo", "hi"]].isna().any().any()
    assert "no band where n = 1" in bands.describe_n(est)
    assert bands.t_interval([0.7]) == (0.7, 0.7, 0.7)
    empty = bands.get_interval_estimates(frame.iloc[:0], ["variant"], "x")
    assert empty.empty and list(empty.columns) == ["variant", "x", "mean", "lo", "hi", "n"]


def test_constant_values_give_a_zero_width_band():
    frame = long_frame({("BN", 1): [0.5, 0.5, 0.5]})
    for method in bands.METHODS:
        row = bands.get_interval_estimates(frame, ["variant"], "x", method=method).iloc[0]
        assert row["lo"] == row["mean"] == row["hi"] == 0.5


def test_bad_arguments_are_refused():
    frame = long_frame({("BN", 1): [0.5, 0.6]})
    with pytest.raises(ValueError, match="method"):
        bands.get_interval_estimates(frame, ["variant"], "x", method="bca")
    with pytest.raises(ValueError, match="confidence_interval_size"):
        bands.get_interval_estimates(frame, ["variant"], "x", confidence_interval_size=1.5)


def test_labels_for_captions():
    assert bands.method_label("t", 0.95) == "95% Student-t interval of the mean"
    assert "bootstrap" in bands.method_label("bootstrap", 0.9)
    assert bands.describe_n([5, 5, 5]) == "n = 5 seeds"
    assert bands.describe_n([3, 5]) == "n = 3–5 seeds per point"


def exact_bootstrap_quantile(values: np.ndarray):
    """Q(p) = min{m : P(M <= m) >= p}, M the mean of a resample of ``values`` with replacement,
    from its exact distribution: every multiset of indices, weighted by its multinomial chance."""
    n = len(values)
    means, weights = [], []
    for pick in itertools.combinations_with_replacement(range(n), n):
        counts = np.bincount(pick, minlength=n)
        means.append(values[list(pick)].mean())
        weights.append(math.factorial(n) / np.prod([math.factorial(k) for k in counts]) / n**n)
    order = np.argsort(means)
    means, cdf = np.asarray(means)[order], np.cumsum(np.asarray(weights)[order])

    def quantile(p: float) -> float:
        return float(means[min(np.searchsorted(cdf, p - 1e-12), len(means) - 1)])

    return quantile


def test_bootstrap_of_interleaved_groups_matches_exact_percentiles_at_the_level():
    """Rows of groups with different n (1, 2, 5, 5, 6, 7 seeds) interleaved in random order, level
    0.8: each group's mean and n are its own, and its interval [lo, hi] is the (0.1, 0.9)
    percentile pair of the bootstrap distribution of its mean. Reference: that distribution
    enumerated exactly per group. The package draws ``reps`` resamples, so its percentiles are
    Monte Carlo estimates: by the DKW inequality each lies, but for a chance below 1e-6, within
    the exact quantiles at p ± eps, eps = sqrt(ln(2e6) / (2 reps)) + 2 / reps (the 2 / reps
    for linear interpolation between order statistics)."""
    level, reps = 0.8, 20_000
    rng = np.random.default_rng(3)
    sizes = {("a", 1): 5, ("a", 2): 7, ("b", 1): 5, ("b", 2): 6, ("c", 1): 2, ("c", 2): 1}
    groups = {key: 10.0 * i + rng.normal(0, 1, n) for i, (key, n) in enumerate(sizes.items())}
    frame = long_frame({key: list(v) for key, v in groups.items()})
    frame = frame.sample(frac=1, random_state=4).reset_index(drop=True)  # interleave the groups
    runs = np.count_nonzero(np.diff(frame.groupby(["variant", "x"]).ngroup().to_numpy())) + 1
    assert runs > 2 * len(groups)  # each group's rows are spread out, not in one block
    est = bands.get_interval_estimates(
        frame, ["variant"], "x", method="bootstrap", confidence_interval_size=level, reps=reps
    )
    assert len(est) == len(groups)
    alpha = (1 - level) / 2
    eps = math.sqrt(math.log(2e6) / (2 * reps)) + 2 / reps
    for row in est.itertuples():
        values = groups[(row.variant, row.x)]
        assert row.n == len(values)
        assert row.mean == pytest.approx(values.mean(), rel=1e-12)
        if len(values) == 1:
            assert row.lo == row.hi == row.mean
            continue
        q = exact_bootstrap_quantile(values)
        for got, p in ((row.lo, alpha), (row.hi, 1 - alpha)):
            assert q(p - eps) - 1e-12 <= got <= q(p + eps) + 1e-12, (row.variant, row.x, p, got)
