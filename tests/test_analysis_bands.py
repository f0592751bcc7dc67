"""Confidence bands across seeds, checked against scipy and against simulation."""

from __future__ import annotations

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
