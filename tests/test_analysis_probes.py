"""The probe summaries (analysis.probe_summary) against hand computation on a tiny study, the
step window's parsing, and results written before the new probe columns existed."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from analysis import layout, load, plots_probes, probe_summary, report, style
from analysis.report import Skip, StepWindow
from analysis.synthetic import write_synthetic_study
from study import epoch_parts, results
from study.results import trial_id

NAN = float("nan")


def _trial(folder, norm: str, seed: int, status: str = "done") -> str:
    tid = trial_id(norm, 0.0, 0.01, seed)
    results.write_trial_row(folder, dict(trial_id=tid, norm=norm, noise=0.0, lr=0.01, epochs=2,
                                         seed=seed, status=status, dataset="synthetic"))
    return tid


def _probes(folder, tid: str, rows: list[tuple]) -> None:
    """``rows``: (step, loss_min, loss_max, loss_dev_min, loss_dev_max, beta, conv1's weight norm)."""
    out = []
    for step, lmin, lmax, dmin, dmax, beta, wn in rows:
        for layer in results.PROBE_LAYERS:
            out.append(dict(trial_id=tid, step=step, epoch=1 + step // 20, layer=layer, ics_l2=1.0,
                            ics_cos=0.5, loss_min=lmin, loss_max=lmax, loss_dev_min=dmin,
                            loss_dev_max=dmax, grad_pred=2 * beta, beta_smooth=beta,
                            weight_norm=wn if layer == "conv1" else 1.0))
    epoch_parts.write_epoch_rows(folder, "probes", tid, results.to_arrow("probes", out))


@pytest.fixture
def tiny(tmp_path):
    """BN seeds 0 and 1 (done) and seed 2 (diverged), probed at steps 0, 10, 20, 30."""
    folder = tmp_path / "tiny"
    a, b, c = (_trial(folder, "batch", s, st) for s, st in ((0, "done"), (1, "done"), (2, "diverged")))
    _probes(folder, a, [(0, 9.0, 9.5, 0.0, 0.1, 50.0, 1.0), (10, 1.0, 1.5, 0.01, 0.02, 3.0, 2.0),
                        (20, 1.0, 1.2, 0.02, 0.05, 5.0, 4.0), (30, 0.0, 9.0, 0.0, 9.0, 70.0, 9.0)])
    _probes(folder, b, [(10, 2.0, 2.4, 0.00, 0.04, 4.0, 3.0), (20, 2.0, 2.1, NAN, NAN, 8.0, 5.0),
                        (25, 2.0, 2.6, 0.01, 0.03, 6.0, 7.0)])
    _probes(folder, c, [(10, 1.0, 1.1, 0.0, 0.01, 1.0, 1.0)])
    return folder


def test_window_medians_and_their_mean_over_seeds_by_hand(tiny):
    study = load.load_study(tiny)
    medians = probe_summary.probe_window_medians(study, StepWindow.parse("10:30"))
    got = medians.set_index(["seed", "layer", "quantity"])
    # seed 0, steps 10 and 20: ranges 0.5 and 0.2; beyond first order 0.01 and 0.03
    assert got.loc[(0, "model", "loss_range"), "median"] == pytest.approx(0.35, rel=1e-12)
    assert got.loc[(0, "model", "loss_dev_range"), "median"] == pytest.approx(0.02, rel=1e-12)
    assert got.loc[(0, "model", "beta_smooth"), "median"] == pytest.approx(4.0, rel=1e-12)
    assert got.loc[(0, "conv1", "weight_norm"), "median"] == pytest.approx(3.0, rel=1e-12)
    assert got.loc[(0, "model", "loss_range"), "n_steps"] == 2
    # seed 1, steps 10, 20, 25: step 20's deviation is NaN, so over two steps
    assert got.loc[(1, "model", "loss_range"), "median"] == pytest.approx(0.4, rel=1e-12)
    assert got.loc[(1, "model", "loss_dev_range"), "median"] == pytest.approx(0.03, rel=1e-12)
    assert got.loc[(1, "model", "loss_dev_range"), "n_steps"] == 2
    assert got.loc[(1, "model", "beta_smooth"), "median"] == pytest.approx(6.0, rel=1e-12)
    # share of the raw range the first-order term explains, 1 − dev ÷ raw per step, then median
    assert got.loc[(0, "model", "first_order_share"), "median"] == pytest.approx(
        np.median([1 - 0.01 / 0.5, 1 - 0.03 / 0.2]), rel=1e-9)
    assert got.loc[(1, "model", "first_order_share"), "median"] == pytest.approx(
        np.median([1 - 0.04 / 0.4, 1 - 0.02 / 0.6]), rel=1e-9)
    assert set(medians["window"]) == {"10:30"} and set(medians["epochs"]) == {2}
    assert set(medians["status"]) == {"done", "diverged"}  # every run, with its status

    summary = probe_summary.probe_window_summary(medians, 0.9).set_index(["layer", "quantity"])
    row = summary.loc[("model", "beta_smooth")]  # the diverged seed is left out: seeds 0 and 1
    x = np.array([4.0, 6.0])
    lo, hi = stats.t.interval(0.9, df=1, loc=x.mean(), scale=x.std(ddof=1) / math.sqrt(2))
    assert (row["mean"], row["n"]) == (5.0, 2)
    assert row["lo"] == pytest.approx(lo, rel=1e-12) and row["hi"] == pytest.approx(hi, rel=1e-12)


def test_the_whole_run_is_the_default_window_and_an_empty_window_is_skipped(tiny):
    study = load.load_study(tiny)
    medians = probe_summary.probe_window_medians(study, StepWindow())
    got = medians.set_index(["seed", "layer", "quantity"])
    assert got.loc[(0, "model", "beta_smooth"), "median"] == pytest.approx(27.5, rel=1e-12)  # 3,5,50,70
    assert set(medians["window"]) == {"all"}
    with pytest.raises(Skip, match="no probed step in the window 100:"):
        probe_summary.probe_window_medians(study, StepWindow.parse("100:"))


def test_probe_comparisons_are_paired_differences_of_the_window_medians(tmp_path):
    folder = tmp_path / "pairs"
    rng = np.random.default_rng(3)
    betas = {}
    for norm in ("none", "batch"):
        for seed in (0, 1, 2):  # seed 2 of BN diverged: BN − no BN falls back to Welch's interval
            tid = _trial(folder, norm, seed, "diverged" if (norm, seed) == ("batch", 2) else "done")
            beta = rng.uniform(1, 9, size=5)
            betas[norm, seed] = beta
            _probes(folder, tid, [(10 * k, 1.0, 1.5, 0.0, 0.1, b, 1.0) for k, b in enumerate(beta)])
    study = load.load_study(folder)
    medians = probe_summary.probe_window_medians(study, StepWindow.parse("10:50"))
    pairs = probe_summary.probe_comparisons(medians, 0.9).set_index("metric")
    row = pairs.loc["beta_smooth"]
    assert row["pair"] == "BN − no BN" and row["window"] == "10:50"
    a = [np.median(betas["batch", s][1:]) for s in (0, 1)]  # steps 10..40
    b = [np.median(betas["none", s][1:]) for s in (0, 1, 2)]
    welch = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.9)
    assert row["method"] == "Welch t" and (row["n_a"], row["n_b"]) == (2, 3)
    assert row["mean"] == pytest.approx(np.mean(a) - np.mean(b), rel=1e-12)
    assert (row["lo"], row["hi"]) == pytest.approx((welch.low, welch.high), rel=1e-9)

    medians = medians[medians["seed"] < 2]  # seeds 0 and 1 of both: paired on seed
    row = probe_summary.probe_comparisons(medians, 0.9).set_index("metric").loc["beta_smooth"]
    d = np.array(a) - np.array([np.median(betas["none", s][1:]) for s in (0, 1)])
    lo, hi = stats.t.interval(0.9, df=1, loc=d.mean(), scale=d.std(ddof=1) / math.sqrt(2))
    assert row["method"] == "paired t" and row["n"] == 2
    assert (row["mean"], row["lo"], row["hi"]) == pytest.approx((d.mean(), lo, hi), rel=1e-9)


@pytest.mark.parametrize("text, start, end", [("10:30", 10, 30), ("10:", 10, None), (":30", 0, 30),
                                               (":", 0, None)])
def test_a_step_window_is_start_inclusive_end_exclusive(text, start, end):
    window = StepWindow.parse(text)
    assert (window.start, window.end) == (start, end)
    steps = np.arange(0, 50)
    want = (steps >= start) & (steps < (end if end is not None else 50))
    assert np.array_equal(window.holds(steps), want)


@pytest.mark.parametrize("text", ["10", "30:10", "5:5", "a:b", "-1:4", "1.5:3"])
def test_a_bad_step_window_is_one_line(text):
    with pytest.raises(ValueError) as e:
        StepWindow.parse(text)
    assert "\n" not in str(e.value) and repr(text) in str(e.value)


def _strip_new_columns(folder) -> None:
    """Rewrite the probes and layers files as the schema before the shape probes wrote them."""
    new = {"probes": ("loss_dev_min", "loss_dev_max", "weight_norm"), "layers": ("weight_norm",)}
    for table, drop in new.items():
        for path in (folder / table).glob("*.parquet"):
            data = pq.read_table(path)
            data = data.filter(pa.compute.not_equal(data["site"], "weight")) if table == "layers" else data
            pq.write_table(data.drop_columns(list(drop)), path)


def test_results_written_before_the_new_columns_still_load_and_draw(tmp_path, monkeypatch):
    folder = tmp_path / "old"
    write_synthetic_study(folder, epochs=1, steps_per_epoch=20, hist_bins=8, probe_every=5,
                          variants=(("none", 0.0), ("batch", 0.0)), lrs=(0.01,), seeds=(0, 1))
    _strip_new_columns(folder)
    assert "weight_norm" not in pq.read_schema(next((folder / "probes").glob("*.parquet"))).names
    study = load.load_study(folder)
    assert study.probes[["loss_dev_min", "loss_dev_max", "weight_norm"]].isna().all().all()
    assert study.layers["weight_norm"].isna().all() and study.probes["loss_min"].notna().all()

    medians = probe_summary.probe_window_medians(study, StepWindow())
    assert "loss_dev_range" not in set(medians["quantity"]) and "loss_range" in set(medians["quantity"])
    with pytest.raises(Skip, match="no weight norms"):
        probe_summary.weight_norms(study)
    drawn = {}
    monkeypatch.setattr(layout.Sheet, "save", lambda sheet, name, *a, **k: drawn.setdefault(name, sheet))
    opts = report.Options(results=folder, out=tmp_path, lr=0.01)
    plots_probes.fig_probes_landscape(study, opts, style.variant_styles(study.trials), report.Report())
    dev = drawn["fig_probes_landscape"].axes[0, 1]
    assert not dev.lines and "not recorded" in dev.texts[0].get_text()


def test_weight_norms_csv_is_the_layers_tables_weight_rows(tmp_path):
    folder = tmp_path / "s"
    write_synthetic_study(folder, epochs=2, steps_per_epoch=10, hist_bins=8, probe_every=0,
                          variants=(("none", 0.0), ("batch", 0.0)), lrs=(0.01,), seeds=(0, 1))
    table = probe_summary.weight_norms(load.load_study(folder))
    raw = {}
    for path in (folder / "layers").glob("*.parquet"):
        for r in pq.read_table(path).to_pylist():
            if r["site"] == "weight":
                raw[(r["trial_id"], r["layer"], r["epoch"])] = r["weight_norm"]
    assert len(table) == len(raw) == 2 * 2 * 2 * len(results.GRAD_LAYERS)
    for r in table.itertuples():
        tid = trial_id("none" if r.variant == "no BN" else "batch", r.noise, r.lr, r.seed)
        assert r.weight_norm == raw[(tid, r.layer, r.epoch)]
    assert list(table.columns) == ["variant", "lr", "noise", "epochs", "seed", "status", "layer",
                                   "epoch", "weight_norm"]
    # over the seeds: the mean of the two runs' norms and scipy's t interval
    summary = probe_summary.weight_norms_summary(table, 0.9).set_index(["variant", "layer", "epoch"])
    x = np.array([raw[(trial_id("batch", 0.0, 0.01, s), "conv2", 2)] for s in (0, 1)])
    lo, hi = stats.t.interval(0.9, 1, loc=x.mean(), scale=stats.sem(x))
    row = summary.loc[("BN", "conv2", 2)]
    assert (row["mean"], row["lo"], row["hi"], row["n"]) == pytest.approx((x.mean(), lo, hi, 2), rel=1e-9)
