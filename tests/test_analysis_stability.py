"""analysis.stability against the definitions of its four quantities, on hand-made runs."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis.stability import STABILITY_METRICS, gradient_stability, run_stability


def test_a_constant_norm_is_perfectly_stable():
    assert run_stability(np.full(50, 3.0)) == {"median_norm": 3.0, "cv": 0.0, "step_change": 0.0,
                                               "max_over_median": 1.0}


def test_a_norm_that_doubles_and_halves_every_step():
    """1, 2, 1, 2, ...: median 1.5, std 0.5 over mean 1.5, |Δ log| = log 2 every step, max 2."""
    got = run_stability(np.tile([1.0, 2.0], 20))
    assert got["median_norm"] == pytest.approx(1.5)
    assert got["cv"] == pytest.approx(1 / 3)
    assert got["step_change"] == pytest.approx(math.log(2))
    assert got["max_over_median"] == pytest.approx(2 / 1.5)


def test_non_finite_and_zero_norms_are_left_out_and_too_few_give_nan():
    clean = run_stability(np.array([1.0, 4.0, 2.0]))
    assert run_stability(np.array([1.0, np.nan, 4.0, np.inf, 0.0, 2.0])) == clean
    assert all(math.isnan(v) for v in run_stability(np.array([5.0, np.nan])).values())


def test_runs_are_taken_apart_and_their_first_epochs_skipped():
    """Two runs' rows interleaved and out of order; epoch 1 holds values that would dominate
    every quantity; no step change may span the two runs."""
    rows = []
    for tid, level in (("a", 1.0), ("b", 100.0)):
        for step in range(40):
            epoch = 1 + step // 10
            g = 1e6 if epoch == 1 else level * (2.0 if step % 2 else 1.0)
            rows.append(dict(trial_id=tid, step=step, epoch=epoch, grad_norm=g))
    steps = pd.DataFrame(rows).sample(frac=1, random_state=0)
    table = gradient_stability(steps, skip_epochs=1).set_index("trial_id")
    assert list(table.columns) == ["steps", *STABILITY_METRICS]
    for tid, level in (("a", 1.0), ("b", 100.0)):
        r = table.loc[tid]
        assert r["steps"] == 30
        assert r["median_norm"] == pytest.approx(1.5 * level)
        assert r["step_change"] == pytest.approx(math.log(2))
        assert r["max_over_median"] == pytest.approx(2 / 1.5)
    with_first = gradient_stability(steps, skip_epochs=0).set_index("trial_id")
    assert (with_first["steps"] == 40).all() and (with_first["max_over_median"] > 1e3).all()


def test_a_layers_norm_gets_its_own_columns():
    steps = pd.DataFrame(dict(trial_id="a", step=range(12), epoch=[1] * 2 + [2] * 10,
                              grad_norm=np.full(12, 5.0), grad_norm_fc1=np.tile([1.0, 2.0], 6)))
    row = gradient_stability(steps, 1, layers=("fc1",)).iloc[0]
    assert row["cv"] == 0.0 and row["cv_fc1"] == pytest.approx(1 / 3)
    assert row["step_change_fc1"] == pytest.approx(math.log(2)) and row["steps"] == 10
