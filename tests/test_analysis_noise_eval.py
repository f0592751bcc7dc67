"""noise_eval_summary.csv (analysis.noise_eval_summary) against scipy on hand-written
accuracies: per noisy variant over the finished runs, the two test accuracies with their t
intervals and the gain paired on the run."""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import load, noise_eval_summary, report
from analysis.report import Skip
from analysis.synthetic import write_synthetic_study
from study import results
from study.results import trial_id

SEEDS = (0, 1, 2, 3)
RUNNING = trial_id("noisy_batch", 2.0, 0.01, 3)
#: (noise, seed) -> (test accuracy as trained, mean-scaled), in percent
HAND = {(1.0, 0): (61.0, 64.5), (1.0, 1): (63.5, 65.0), (1.0, 2): (58.0, 63.0), (1.0, 3): (60.0, 64.0),
        (2.0, 0): (45.0, 60.0), (2.0, 1): (50.0, 58.5), (2.0, 2): (40.0, 59.0), (2.0, 3): (44.0, 61.0)}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("noise_eval") / "study"
    write_synthetic_study(folder, variants=(("batch", 0.0), ("noisy_batch", 1.0), ("noisy_batch", 2.0)),
                          lrs=(0.01,), seeds=SEEDS, epochs=2, steps_per_epoch=4, hist_bins=8,
                          per_epoch=False, outcome={RUNNING: ("running", 1)})
    with (folder / results.NOISE_EVAL_FILE).open("w", newline="") as f:
        rows = [(trial_id("noisy_batch", noise, 0.01, seed), 2, 1 + noise / 8, a, b)
                for (noise, seed), (a, b) in HAND.items()]
        rows.append(("noisy_batch-noise1-lr0.01-seed9", 2, 1.125, 0.0, 0.0))  # not in this study
        csv.writer(f).writerows([results.NOISE_EVAL_COLUMNS, *rows])
    return load.load_study(folder)


def test_summary_is_scipys_intervals_over_the_finished_runs(study):
    table = noise_eval_summary.noise_eval_summary(noise_eval_summary.read_noise_eval(study), 0.95)
    assert len(table) == 2  # the two noisy variants; BN has no noise to evaluate
    for noise, seeds in ((1.0, SEEDS), (2.0, SEEDS[:3])):  # noise 2's seed 3 still runs: left out
        row = table[table["expected_scale"] == 1 + noise / 8].iloc[0]
        plain = np.array([HAND[(noise, s)][0] for s in seeds])
        scaled = np.array([HAND[(noise, s)][1] for s in seeds])
        ref = stats.t.interval(0.95, len(seeds) - 1, loc=plain.mean(), scale=stats.sem(plain))
        gain = stats.ttest_rel(scaled, plain).confidence_interval(0.95)
        assert row["n"] == len(seeds) and row["epochs"] == 2
        assert (row["test_acc"], row["test_acc_lo"], row["test_acc_hi"]) == pytest.approx(
            (plain.mean(), *ref), rel=1e-12)
        assert row["mean_scaled"] == pytest.approx(scaled.mean(), rel=1e-12)
        assert (row["gain"], row["gain_lo"], row["gain_hi"]) == pytest.approx(
            ((scaled - plain).mean(), gain.low, gain.high), rel=1e-12)
        assert (row["gain_min"], row["gain_max"]) == ((scaled - plain).min(), (scaled - plain).max())


def test_csv_and_index_table_are_written_and_a_folder_without_the_file_is_skipped(study, tmp_path):
    rep = report.Report()
    noise_eval_summary.write_noise_eval_summary(study, report.Options(results=study.paths[0], out=tmp_path),
                                                rep)
    written = pd.read_csv(tmp_path / "noise_eval_summary.csv")
    assert list(written.columns) == noise_eval_summary.COLUMNS and len(written) == 2
    assert rep.tables[0][0] == "Noisy BN evaluated with its noise's mean scale"
    (study.paths[0] / results.NOISE_EVAL_FILE).rename(tmp_path / "aside.csv")
    try:
        with pytest.raises(Skip, match="study.noise_eval"):
            noise_eval_summary.read_noise_eval(study)
    finally:
        (tmp_path / "aside.csv").rename(study.paths[0] / results.NOISE_EVAL_FILE)
