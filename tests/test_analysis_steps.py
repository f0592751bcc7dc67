"""The steps table read a trial at a time (``analysis.steps``, issue 24): the trials' frames
are the whole table's rows, and what figure 3 and the gradient-stability table compute from
them trial by trial is what the whole-table computation gives, to the last bit."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from analysis import load, series, tables
from analysis.folder import ResultsError, trial_rows
from analysis.stability import gradient_stability
from analysis.synthetic import write_synthetic_study
from study import epoch_parts, results
from study.results import trial_id

VARIANTS = (("none", 0.0), ("batch", 0.0), ("noisy_batch", 1.0))
RUNNING = trial_id("none", 0.0, 1e-3, 1)
STRAY = trial_id("batch", 0.0, 5e-2, 9)


@pytest.fixture(scope="module", params=["compacted", "parts"])
def study(request, tmp_path_factory) -> load.Study:
    """9 trials of 3 epochs a lr × 2 lrs (one still running) and 3 of 2 epochs, compacted or
    left in per-epoch files, and a steps file of a trial with no trials row."""
    folder = tmp_path_factory.mktemp(request.param) / "study"
    write_synthetic_study(folder, variants=VARIANTS, lrs=(1e-3, 1e-2), seeds=(0, 1, 2), epochs=3,
                          steps_per_epoch=250, hist_bins=8, outcome={RUNNING: ("running", 2)},
                          compact=request.param == "compacted", study_json=False)
    write_synthetic_study(folder, variants=VARIANTS, lrs=(1e-2,), seeds=(3,), epochs=2, steps_per_epoch=250,
                          hist_bins=8, compact=request.param == "compacted", study_json=False, random_state=1)
    stray = results.to_arrow("steps", {"trial_id": [STRAY] * 7, "step": list(range(7)), "epoch": [1] * 7,
                                       "grad_norm": [1.0] * 7})
    epoch_parts.write_epoch_rows(folder, "steps", STRAY, stray)
    return load.load_study(folder)


def test_trial_frames_are_the_whole_tables_rows_in_its_order(study):
    whole = study.steps.frame()
    frames = list(study.steps.frames())
    order = whole["trial_id"].cat.remove_unused_categories().cat.categories
    assert [str(f["trial_id"].iloc[0]) for f in frames] == list(order)
    assert all(f["trial_id"].nunique() == 1 for f in frames)
    pd.testing.assert_frame_equal(
        pd.concat(frames, ignore_index=True).astype({c: "object" for c in ("trial_id", "status", "norm",
                                                                        "dataset")}),
        whole.astype({c: "object" for c in ("trial_id", "status", "norm", "dataset")}), check_exact=True)
    assert study.steps.rows == whole["trial_id"].astype(str).value_counts(sort=False).to_dict()
    some = set(study.trials["trial_id"][::4])
    got = pd.concat(study.steps.frames(some, ["grad_norm"]), ignore_index=True)
    assert set(got["trial_id"].astype(str)) == some and "loss" not in got
    expected = whole[whole["trial_id"].astype(str).isin(some)].reset_index(drop=True)
    np.testing.assert_array_equal(got["grad_norm"], expected["grad_norm"])


@pytest.mark.parametrize("batch_rows", [1, 1000])
def test_trials_read_in_batches_of_any_size_are_the_same_frames(study, batch_rows):
    """Trials read a few at a time (and the one without a trials row between them) give each
    trial's frame as a read of one trial at a time does."""
    one_by_one = [f.astype({c: "object" for c in ("trial_id", "status", "norm", "dataset")})
                  for f in replace(study.steps, batch_rows=1).frames()]
    got = [f.astype({c: "object" for c in ("trial_id", "status", "norm", "dataset")})
           for f in replace(study.steps, batch_rows=batch_rows).frames()]
    assert len(got) == len(one_by_one) == len(study.steps.trial_ids)
    for a, b in zip(got, one_by_one, strict=True):
        pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_rows_of_a_trial_without_a_trials_row_are_noted_and_left_out(study):
    assert f"steps: 7 rows of 1 trial(s) without a trials row were ignored ({STRAY})" in study.notices
    assert STRAY not in study.steps.rows and STRAY not in set(study.steps.frame()["trial_id"])


def test_step_curves_read_a_trial_at_a_time_equal_those_of_the_whole_table(study):
    whole = study.steps.frame()
    at_lr = series.drawable(series.at_lr(whole, 1e-3))
    at_lr = at_lr.assign(trial_id=at_lr["trial_id"].cat.remove_unused_categories())
    ids = set(at_lr["trial_id"].astype(str))
    every = study.trials.set_index("trial_id")["grad_every"]
    columns = ["grad_norm", "grad_norm_conv1"]
    expected = series.smoothed_step_curves(at_lr, columns, 30, every, max_points=100)
    present: dict[str, bool] = {}
    got = series.smoothed_step_curves(lambda cols: study.steps.frames(ids, cols), columns, 30, every,
                                      max_points=100, present=present)
    pd.testing.assert_frame_equal(got, expected, check_exact=True)
    assert present == dict.fromkeys(columns, True)
    # an independent reference for one trial: pandas' rolling mean, then the bins' means
    one = at_lr[at_lr["trial_id"] == RUNNING].sort_values("step")
    rolled = one["grad_norm"].astype(float).rolling(30, min_periods=1).mean()
    bins = got.loc[got["trial_id"] == RUNNING, "bin"].to_numpy()
    steps = np.unique(at_lr["step"])
    edges = np.minimum((one["step"].to_numpy() - steps[0]) * 100 // (steps[-1] - steps[0] + 1), 99)
    ref = rolled.groupby(edges).mean()
    np.testing.assert_allclose(got.loc[got["trial_id"] == RUNNING, "grad_norm"], ref.reindex(bins), rtol=1e-9)


def test_stability_read_a_trial_at_a_time_equals_the_whole_table_computation(study):
    runs, skips = tables.stability_runs(study)
    whole = study.steps.frame()
    lengths = dict(zip(runs["trial_id"], runs["epochs"], strict=True))
    assert sorted(set(lengths.values())) == [2, 3] and skips == {2: 1, 3: 1}
    expected = gradient_stability(whole, 1, tuple(results.GRAD_LAYERS)).set_index("trial_id")
    got = runs.set_index("trial_id")[expected.columns]
    pd.testing.assert_frame_equal(got.sort_index(), expected.sort_index(), check_exact=True)


def test_rows_are_counted_from_the_footer_only_where_it_names_the_files_trial_alone(tmp_path):
    """A compacted file's rows per trial, counted from its footer or (where its statistics
    name another trial too) from its ``trial_id`` column, are the rows it holds."""
    one, other = trial_id("none", 0.0, 1e-3, 0), trial_id("batch", 0.0, 1e-3, 0)

    def rows(ids: list[str]) -> pa.Table:
        return results.to_arrow("steps", {"trial_id": ids, "step": list(range(len(ids))),
                                          "epoch": [1] * len(ids), "grad_norm": [1.0] * len(ids)})

    alone, mixed = tmp_path / "alone" / f"{one}.parquet", tmp_path / "mixed" / f"{one}.parquet"
    for path, ids in ((alone, [one] * 5), (mixed, [one] * 3 + [other] * 4)):
        path.parent.mkdir()
        results.write_atomic(rows(ids), path)
    assert trial_rows([alone], "steps") == {one: 5}
    assert trial_rows([mixed], "steps") == {one: 3, other: 4}
    with pytest.raises(ResultsError, match="holds table 'steps', not 'epochs'"):
        trial_rows([alone], "epochs")
