"""The paired comparisons between variants (comparisons.csv, .md, .tex) written by
``python -m analysis.figures``, against scipy's paired and Welch intervals computed from the
Parquet files by hand; and runs of different lengths, never pooled or set side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.synthetic import write_synthetic_study
from study import results
from study.results import trial_id
from tests.test_analysis import RUNNING, run_main, study  # noqa: F401  (study: the shared fixture)

PAIR_ORDER = ["BN − no BN", "noisy BN (noise 0.5) − no BN", "noisy BN (noise 1) − no BN",
              "noisy BN (noise 0.5) − BN", "noisy BN (noise 1) − BN",
              "noisy BN (noise 1) − noisy BN (noise 0.5)"]


def last_epoch(folder: Path, tid: str) -> pd.Series:
    """A trial's last recorded row of the epochs table, read straight from its file."""
    return pd.read_parquet(results.table_path(folder, "epochs", tid)).sort_values("epoch").iloc[-1]


def window_cv(folder: Path, tid: str, first_epoch: int) -> float:
    """std ÷ mean of a trial's finite global gradient norms from ``first_epoch`` on."""
    steps = pd.read_parquet(results.table_path(folder, "steps", tid))
    g = steps[steps["epoch"] >= first_epoch].sort_values("step")["grad_norm"].to_numpy(np.float64)
    g = g[np.isfinite(g) & (g > 0)]
    return float(g.std() / g.mean())


def row(csv: pd.DataFrame, pair: str, lr: float, metric: str) -> pd.Series:
    got = csv[(csv["pair"] == pair) & np.isclose(csv["lr"], lr) & (csv["metric"] == metric)]
    assert len(got) == 1, (pair, lr, metric)
    return got.iloc[0]


def test_paired_differences_equal_scipys_paired_t_on_the_runs(study):  # noqa: F811
    """noisy BN (noise 1) − BN at lr 0.001: every seed finished for both, so the interval is
    scipy's ttest_rel over the per-seed values, for an accuracy and a stability quantity."""
    assert study["code"] == 0, study["stderr"]
    out, folder = study["folder"] / "figures", study["folder"]
    csv = pd.read_csv(out / "comparisons.csv")
    assert list(csv.columns[:9]) == ["pair", "lr", "epochs", "metric", "mean", "lo", "hi", "n", "method"]
    assert list(dict.fromkeys(csv["pair"])) == PAIR_ORDER
    seeds = (0, 1, 2)
    a = [100 * last_epoch(folder, trial_id("noisy_batch", 1.0, 1e-3, s))["test_acc"] for s in seeds]
    b = [100 * last_epoch(folder, trial_id("batch", 0.0, 1e-3, s))["test_acc"] for s in seeds]
    ref = stats.ttest_rel(a, b).confidence_interval(0.95)
    got = row(csv, "noisy BN (noise 1) − BN", 1e-3, "test_acc")
    assert got["method"] == "paired t" and got["n"] == 3 and got["epochs"] == 3
    assert got["mean"] == pytest.approx(np.mean(np.subtract(a, b)), rel=1e-9)
    assert (got["lo"], got["hi"]) == pytest.approx((ref.low, ref.high), rel=1e-9)
    md = (out / "comparisons.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| noisy BN (noise 1) − BN | 0.001 | 3 |"))
    assert f"| {np.mean(np.subtract(a, b)):.2f} [{ref.low:.2f}, {ref.high:.2f}] (3) |" in line

    a = [window_cv(folder, trial_id("noisy_batch", 1.0, 1e-3, s), 2) for s in seeds]
    b = [window_cv(folder, trial_id("batch", 0.0, 1e-3, s), 2) for s in seeds]
    ref = stats.ttest_rel(a, b).confidence_interval(0.95)
    got = row(csv, "noisy BN (noise 1) − BN", 1e-3, "cv")
    assert (got["mean"], got["lo"], got["hi"]) == pytest.approx(
        (np.mean(np.subtract(a, b)), ref.low, ref.high), rel=1e-9)

    # no BN's seed 2 is still running: only done runs count, so BN − no BN is unpaired
    welch = row(csv, "BN − no BN", 1e-3, "train_acc")
    a = [100 * last_epoch(folder, trial_id("batch", 0.0, 1e-3, s))["train_acc"] for s in seeds]
    b = [100 * last_epoch(folder, trial_id("none", 0.0, 1e-3, s))["train_acc"] for s in (0, 1)]
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert RUNNING == trial_id("none", 0.0, 1e-3, 2)
    assert welch["method"] == "Welch t" and (welch["n_a"], welch["n_b"]) == (3, 2)
    assert (welch["lo"], welch["hi"]) == pytest.approx((ref.low, ref.high), rel=1e-9)

    index = (out / "index.md").read_text()
    assert "## Paired comparisons" in index and "[comparisons.csv](comparisons.csv)" in index
    assert "<th>A − B</th>" in (out / "index.html").read_text()
    assert "BN $-$ no BN" in (out / "comparisons.tex").read_text()


def test_a_variant_that_lacks_a_seed_gets_welchs_interval_and_the_table_says_so(tmp_path):
    folder, out = tmp_path / "lacks", tmp_path / "fig"
    small = dict(lrs=(1e-3,), epochs=2, steps_per_epoch=10, hist_bins=8)
    write_synthetic_study(folder, variants=(("none", 0.0),), seeds=(0, 1, 2, 3), **small)
    write_synthetic_study(folder, variants=(("batch", 0.0),), seeds=(0, 1, 2), study_json=False,
                          random_state=1, **small)
    code, _, err = run_main([str(folder), "--out", str(out), "--format", "png", "--level", "0.9"])
    assert code == 0, err
    a = [100 * last_epoch(folder, trial_id("batch", 0.0, 1e-3, s))["val_acc"] for s in range(3)]
    b = [100 * last_epoch(folder, trial_id("none", 0.0, 1e-3, s))["val_acc"] for s in range(4)]
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.9)
    got = row(pd.read_csv(out / "comparisons.csv"), "BN − no BN", 1e-3, "val_acc")
    assert got["method"] == "Welch t" and (got["n_a"], got["n_b"]) == (3, 4)
    assert got["mean"] == pytest.approx(np.mean(a) - np.mean(b), rel=1e-9)
    assert (got["lo"], got["hi"]) == pytest.approx((ref.low, ref.high), rel=1e-9)
    md = (out / "comparisons.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| BN − no BN |"))
    assert line.endswith("| Welch t |") and "(3 vs 4)" in line and "90% interval" in md
    assert "Welch's interval of the difference of the two means" in md


def test_runs_of_different_lengths_are_never_paired_or_pooled(tmp_path):
    """At lr 0.001 no BN and BN ran 3 epochs, noisy BN 2; at lr 0.01 no BN and BN ran 2."""
    folder, out = tmp_path / "lengths", tmp_path / "fig"
    small = dict(steps_per_epoch=10, hist_bins=8, seeds=(0, 1))
    write_synthetic_study(folder, variants=(("none", 0.0), ("batch", 0.0)), lrs=(1e-3,), epochs=3, **small)
    write_synthetic_study(folder, variants=(("noisy_batch", 1.0),), lrs=(1e-3,), epochs=2,
                          study_json=False, random_state=1, **small)
    write_synthetic_study(folder, variants=(("none", 0.0), ("batch", 0.0)), lrs=(1e-2,), epochs=2,
                          study_json=False, random_state=2, **small)
    code, _, err = run_main([str(folder), "--out", str(out), "--format", "png"])
    assert code == 0, err
    csv = pd.read_csv(out / "comparisons.csv")
    formed = set(zip(csv["pair"], csv["lr"], csv["epochs"], strict=True))
    assert formed == {("BN − no BN", 0.001, 3), ("BN − no BN", 0.01, 2)}
    md = (out / "comparisons.md").read_text()
    assert "noisy BN (noise 1) − no BN at lr 0.001 (2 vs 3 epochs)" in md
    assert "noisy BN (noise 1) − BN at lr 0.001 (2 vs 3 epochs)" in md

    # the gradient-stability table: a row per variant, lr and length, each over its own window
    table = pd.read_csv(out / "gradient_stability.csv")
    assert sorted(zip(table["variant"], table["lr"], table["epochs"], strict=True)) == sorted(
        [("no BN", 0.001, 3), ("BN", 0.001, 3), ("noisy BN (noise 1)", 0.001, 2),
         ("no BN", 0.01, 2), ("BN", 0.01, 2)])
    noisy = table[table["variant"] == "noisy BN (noise 1)"].iloc[0]
    cvs = [window_cv(folder, trial_id("noisy_batch", 1.0, 1e-3, s), 2) for s in (0, 1)]
    assert noisy["cv_mean"] == pytest.approx(np.mean(cvs), rel=1e-9) and noisy["n"] == 2
    text = (out / "gradient_stability.md").read_text()
    assert "| noisy BN (noise 1) | 0.001 | 2 |" in text
    assert "epoch 2 of 2-epoch runs, epochs 2–3 of 3-epoch runs" in text
    assert "never pooled" in text and "2 and 3 epochs" in text


def test_no_comparison_at_all_is_a_notice_naming_the_pairs_of_different_lengths(tmp_path):
    folder, out = tmp_path / "apart", tmp_path / "fig"
    small = dict(lrs=(1e-3,), steps_per_epoch=10, hist_bins=8, seeds=(0, 1))
    write_synthetic_study(folder, variants=(("none", 0.0),), epochs=3, **small)
    write_synthetic_study(folder, variants=(("batch", 0.0),), epochs=2, study_json=False, **small)
    code, stdout, err = run_main([str(folder), "--out", str(out), "--format", "png"])
    assert code == 0, err
    assert not (out / "comparisons.csv").exists()
    assert "comparisons skipped" in stdout and "BN − no BN at lr 0.001 (2 vs 3 epochs)" in stdout
