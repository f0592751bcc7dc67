"""What ``python -m analysis.figures`` writes for a study at the seed notebook's settings: the
comparison with the seed's published accuracies (against scipy by hand), the per-batch spread
CSV (against the Parquet files), the paired accuracy-difference figure (against scipy's
``ttest_rel``), and titles and captions fit to publish (unique, no local paths, the noise
scope in the legend)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from scipy import stats  # noqa: E402

from analysis import captions, layout, load, paired, plots_training, report, seed_comparison, style  # noqa: E402
from analysis.synthetic import write_synthetic_study  # noqa: E402
from study import results  # noqa: E402
from study.results import trial_id  # noqa: E402
from tests.test_analysis import run_main  # noqa: E402
from tests.test_analysis_drawn import band_edges  # noqa: E402

SEEDS = (0, 1, 2, 3)
VARIANTS = (("none", 0.0), ("batch", 0.0), ("noisy_batch", 1.0))
#: noisy BN's seed 3 still runs at the seed's lr: only finished runs count in the comparison.
RUNNING = trial_id("noisy_batch", 1.0, 1e-3, 3)


@pytest.fixture(scope="module")
def seed_study(tmp_path_factory) -> dict:
    """The seed's grid (no BN, BN, noisy BN at noise 1 with per-layer draws; lr 1e-3, 10
    epochs, batch 16), 4 seeds, read from an image folder at an absolute path; drawn."""
    root = tmp_path_factory.mktemp("seedcmp")
    folder = root / "study"
    data = root / "private-data-dir" / "cifar10_jpeg"
    write_synthetic_study(folder, variants=VARIANTS, lrs=(1e-3,), seeds=SEEDS, epochs=10,
                          steps_per_epoch=4, hist_bins=8, per_epoch=False, noise_scope="layer",
                          dataset=f"imagefolder:{data}", outcome={RUNNING: ("running", 6)})
    code, stdout, stderr = run_main([str(folder), "--format", "png"])
    assert code == 0, stderr
    return {"folder": folder, "out": folder / "figures", "data": data, "stdout": stdout}


def last_train_acc(folder: Path, tid: str) -> float:
    epochs = pd.read_parquet(results.table_path(folder, "epochs", tid)).sort_values("epoch")
    return 100 * float(epochs["train_acc"].iloc[-1])


# --------------------------------------------------------------------------- the seed's table


def test_prediction_interval_is_the_textbook_one():
    """mean ± t(0.975, n − 1) · s · √(1 + 1/n), from scipy; none from one value."""
    x = np.array([63.2, 64.9, 61.7, 65.3, 62.8])
    half = stats.t.ppf(0.975, 4) * np.std(x, ddof=1) * np.sqrt(1 + 1 / 5)
    assert seed_comparison.prediction_interval(x, 0.95) == pytest.approx(
        (x.mean() - half, x.mean() + half), rel=1e-12)
    half90 = stats.t.ppf(0.95, 4) * np.std(x, ddof=1) * np.sqrt(1.2)
    assert seed_comparison.prediction_interval(x, 0.9)[1] == pytest.approx(x.mean() + half90, rel=1e-12)
    assert np.isnan(seed_comparison.prediction_interval(np.array([64.0]))).all()


def test_seed_settings_are_the_seed_presets():
    from study.grid import PRESETS

    p = PRESETS["seed"]
    s = seed_comparison.SEED_SETTINGS
    assert (s["epochs"], s["batch_size"], s["noise_scope"]) == (p.epochs, p.batch_size, p.noise_scope)
    assert [s["lr"]] == list(p.lrs) and [s["noise"]] == list(p.noises)
    assert set(seed_comparison.SEED_TRAIN_ACC) == set(p.norms)


def test_seed_comparison_equals_hand_computation(seed_study):
    """Per variant, over the finished runs at lr 1e-3 read from the Parquet files: the mean,
    scipy's t interval, the prediction interval, and whether the seed's value lies in it."""
    folder, out = seed_study["folder"], seed_study["out"]
    csv = pd.read_csv(out / "seed_comparison.csv").set_index("norm")
    assert list(csv["variant"]) == ["no BN", "BN", "noisy BN (noise 1, per layer)"]
    for norm, noise in VARIANTS:
        done = [s for s in SEEDS if trial_id(norm, noise, 1e-3, s) != RUNNING]
        x = np.array([last_train_acc(folder, trial_id(norm, noise, 1e-3, s)) for s in done])
        n, mean, sd = len(x), x.mean(), x.std(ddof=1)
        ci = stats.t.interval(0.95, n - 1, loc=mean, scale=stats.sem(x))
        q = stats.t.ppf(0.975, n - 1)
        pi = (mean - q * sd * np.sqrt(1 + 1 / n), mean + q * sd * np.sqrt(1 + 1 / n))
        r = csv.loc[norm]
        published = {"none": 64.11, "batch": 70.64, "noisy_batch": 69.09}[norm]
        assert r["n"] == n and r["seed_train_acc"] == published
        assert (r["mean"], r["ci_lo"], r["ci_hi"]) == pytest.approx((mean, *ci), rel=1e-9)
        assert (r["pi_lo"], r["pi_hi"]) == pytest.approx(pi, rel=1e-9)
        assert bool(r["seed_in_pi"]) == (pi[0] <= published <= pi[1])
    assert csv.loc["noisy_batch", "n"] == 3  # seed 3 still runs
    md = (out / "seed_comparison.md").read_text()
    r = csv.loc["batch"]
    assert (f"| BN | 70.64 | {r['mean']:.2f} [{r['ci_lo']:.2f}, {r['ci_hi']:.2f}] (4) | "
            f"[{r['pi_lo']:.2f}, {r['pi_hi']:.2f}] | {'yes' if r['seed_in_pi'] else 'no'} |") in md
    assert "## Comparison with the seed notebook" in (out / "index.md").read_text()


def test_seed_comparison_needs_the_seeds_settings(seed_study, tmp_path):
    """Runs at the seed's settings but per-channel noise: noisy BN's row is empty (n = 0); no
    run of the seed's length at all: nothing to compare, and the reason is one line."""
    study = load.load_study(seed_study["folder"])
    trials = study.trials.assign(noise_scope="channel")
    table = seed_comparison.seed_comparison(
        load.Study(study.paths, trials, study.epochs, study.layers, study.steps, None), 0.95)
    assert table.set_index("norm")["n"].to_dict() == {"none": 4, "batch": 4, "noisy_batch": 0}
    short = study.trials.assign(epochs=4)
    with pytest.raises(report.Skip, match=r"^the study has no finished runs at the seed's settings "
                       r"\(lr 0.001, 10 epochs, batch 16; noisy BN at noise 1 per layer\)$"):
        seed_comparison.seed_comparison(
            load.Study(study.paths, short, study.epochs, study.layers, study.steps, None), 0.95)


# --------------------------------------------------------------------------- batch spread


def test_batch_spread_csv_equals_the_layers_files(seed_study):
    """Every activation row (conv output, ReLU input) of every trial's layers file, with the
    trial's variant, settings and run length from its trials row."""
    folder = seed_study["folder"]
    got = pd.read_csv(seed_study["out"] / "batch_spread.csv")
    assert list(got.columns[:12]) == ["variant", "norm", "noise", "noise_scope", "lr", "epochs",
                                      "seed", "status", "trial_id", "layer", "site", "epoch"]
    want = []
    for norm, noise in VARIANTS:
        for seed in SEEDS:
            tid = trial_id(norm, noise, 1e-3, seed)
            rows = pd.read_parquet(results.table_path(folder, "layers", tid))
            rows = rows[rows["site"].isin(["conv", "preact"])]  # not the weight-norm rows
            trial = pd.read_parquet(results.table_path(folder, "trials", tid)).iloc[0]
            want.append(rows.assign(epochs=trial["epochs"], noise_scope=trial["noise_scope"],
                                    status=trial["status"]))
    want = pd.concat(want)
    assert len(got) == len(want)
    keys = ["trial_id", "layer", "site", "epoch"]
    both = got.merge(want, on=keys, suffixes=("", "_file"), validate="one_to_one")
    assert len(both) == len(want)
    for col in ("batch_mean_std", "batch_var_std", "mean", "var"):
        np.testing.assert_allclose(both[col], both[f"{col}_file"], rtol=1e-15, err_msg=col)
    for col in ("epochs", "noise_scope", "status"):
        assert (both[col] == both[f"{col}_file"]).all(), col
    running = got[got["trial_id"] == RUNNING]
    assert set(running["status"]) == {"running"} and running["epoch"].max() == 6
    assert "[batch_spread.csv](batch_spread.csv)" in (seed_study["out"] / "index.md").read_text()


def test_batch_spread_summary_is_scipys_t_interval_over_the_finished_runs(seed_study):
    """Each (variant, layer, site, quantity, epoch) over the seeds: noisy BN's seed 3 still
    runs, so its 3 finished seeds only."""
    runs = pd.read_csv(seed_study["out"] / "batch_spread.csv")
    got = pd.read_csv(seed_study["out"] / "batch_spread_summary.csv")
    noisy = next(v for v in set(got["variant"]) if v.startswith("noisy BN"))
    for name, n in (("BN", 4), (noisy, 3)):
        for quantity in ("var", "batch_mean_std"):
            x = runs[(runs["variant"] == name) & (runs["status"] == "done") & (runs["layer"] == "conv2")
                     & (runs["site"] == "conv") & (runs["epoch"] == 5)][quantity].to_numpy()
            row = got[(got["variant"] == name) & (got["layer"] == "conv2") & (got["site"] == "conv")
                      & (got["quantity"] == quantity) & (got["epoch"] == 5)].iloc[0]
            lo, hi = stats.t.interval(0.95, n - 1, loc=x.mean(), scale=stats.sem(x))
            assert len(x) == row["n"] == n
            assert (row["mean"], row["lo"], row["hi"]) == pytest.approx((x.mean(), lo, hi), rel=1e-12)


# --------------------------------------------------------------------------- differences


def test_paired_curves_equal_scipys_paired_t_on_a_hand_frame():
    """Per variant and x: the mean of the per-seed differences from the reference over the
    seeds both have (a seed missing on one side is left out there), ttest_rel's interval."""
    ref = {0: [1.0, 2.0], 1: [1.5, 2.5], 2: [0.5, 2.25], 3: [2.0, np.nan]}
    var = {0: [2.0, 2.5], 1: [2.25, 3.5], 2: [1.75, 2.0], 3: [3.0, 4.0]}
    rows = [dict(variant=v, seed=s, epoch=e + 1, acc=vals[e])
            for v, d in (("ref", ref), ("A", var)) for s, vals in d.items() for e in range(2)]
    frame = pd.DataFrame(rows)
    got = paired.paired_curves(frame, "acc", "epoch", "ref", 0.9).set_index(["variant", "epoch"])
    assert set(got.index) == {("A", 1), ("A", 2)}
    for epoch, seeds in ((1, [0, 1, 2, 3]), (2, [0, 1, 2])):
        a = [var[s][epoch - 1] for s in seeds]
        b = [ref[s][epoch - 1] for s in seeds]
        ci = stats.ttest_rel(a, b).confidence_interval(0.9)
        r = got.loc[("A", epoch)]
        assert r["n"] == len(seeds)
        assert (r["mean"], r["lo"], r["hi"]) == pytest.approx(
            (np.mean(np.subtract(a, b)), ci.low, ci.high), rel=1e-12)


def test_difference_figure_draws_paired_t_bands_from_the_runs(seed_study, monkeypatch):
    """The top row is each variant minus no BN, the bottom noisy BN minus BN; each line is the
    mean per-seed difference of the epochs files' accuracies over the seeds both have (noisy
    BN's seed 3 stopped after epoch 6), each band ttest_rel's interval; the legend names noisy
    BN's per-layer noise."""
    folder = seed_study["folder"]
    study = load.load_study(folder)
    drawn = {}
    monkeypatch.setattr(layout.Sheet, "save",
                        lambda sheet, name, *a, **k: drawn.setdefault(name, (sheet, k["legend"])))
    opts = report.Options(results=folder, out=folder, lr=1e-3, lr_is_default=False, level=0.9)
    plots_training.fig_accuracy_differences(study, opts, style.variant_styles(study.trials), report.Report())
    sheet, legend = drawn["fig_accuracy_differences"]
    acc = {(norm, s): pd.read_parquet(results.table_path(folder, "epochs", trial_id(norm, z, 1e-3, s)))
           .set_index("epoch") for norm, z in VARIANTS for s in SEEDS}
    cases = [(0, "none", "batch"), (0, "none", "noisy_batch"), (1, "batch", "noisy_batch")]
    for r, base, norm in cases:
        for c, column in enumerate(("train_acc", "test_acc")):
            ax = sheet.axes[r, c]
            label = {"batch": "BN", "noisy_batch": "noisy BN (noise 1)"}[norm]
            (line,) = [ln for ln in ax.lines if ln.get_label() == label]
            means, los, his = [], [], []
            for epoch in range(1, 11):
                seeds = [s for s in SEEDS if epoch in acc[(norm, s)].index]
                assert len(seeds) == (3 if norm == "noisy_batch" and epoch > 6 else 4)
                a = [100 * acc[(norm, s)].loc[epoch, column] for s in seeds]
                b = [100 * acc[(base, s)].loc[epoch, column] for s in seeds]
                ci = stats.ttest_rel(a, b).confidence_interval(0.9)
                means.append(np.mean(np.subtract(a, b)))
                los.append(ci.low)
                his.append(ci.high)
            np.testing.assert_allclose(line.get_ydata(), means, rtol=1e-9)
            xs, lo, hi = band_edges(ax, line.get_color())
            np.testing.assert_allclose(xs, np.arange(1, 11))
            np.testing.assert_allclose(lo, los, rtol=1e-9)
            np.testing.assert_allclose(hi, his, rtol=1e-9)
    assert [h.get_label() for h in legend] == ["BN", "noisy BN (noise 1, per layer)"]
    plt.close(sheet.fig)


# --------------------------------------------------------------------------- titles, captions


def figure_titles(index: str) -> dict[str, str]:
    """Each figure's title on the index page, by its file name."""
    return {name: title for title, name in re.findall(r"^!\[(.*)\]\((\w+)\.png\)$", index, re.M)}


def test_titles_are_unique_and_name_the_runs_drawn(seed_study):
    """No two figures share a title; each names the lr, the run length and the noise of the
    runs it draws; the same figure of runs at another lr, length or noise scope is titled
    apart."""
    titles = figure_titles((seed_study["out"] / "index.md").read_text())
    assert len(titles) == 5 and len(set(titles.values())) == len(titles)  # no probes, one lr
    for name in ("fig1_activations", "fig2_noisy_bn", "fig3_gradients", "fig_accuracy_differences"):
        assert "(lr 0.001, 10 epochs" in titles[name], titles[name]
    assert titles["fig2_noisy_bn"].endswith("(lr 0.001, 10 epochs, noise 1 per layer)")
    assert titles["fig1_activations"].endswith("(lr 0.001, 10 epochs)")  # no noisy BN drawn
    study = load.load_study(seed_study["folder"])
    other = study.trials.assign(lr=0.01, epochs=4, noise_scope="channel")
    elsewhere = load.Study(study.paths, other, study.epochs, study.layers, study.steps, None)
    at = captions.titled("Figure 3", elsewhere, report.Options(results=Path(), out=Path(), lr=0.01))
    assert at == "Figure 3 (lr 0.01, 4 epochs, noise 1 per channel)"


def test_captions_carry_no_local_path(seed_study):
    """The data were read from a folder at an absolute path: the captions, tables and index
    name the folder's last part only (the path stays in the index's configuration list)."""
    out, data = seed_study["out"], seed_study["data"]
    index = (out / "index.md").read_text()
    config, rest = index.split("## Notices", 1)
    assert str(data) in config  # where the data came from is part of the settings
    assert str(data.parent) not in rest and "private-data-dir" not in rest
    assert rest.count("Dataset: image folder cifar10_jpeg.") >= 6
    for md in out.glob("*.md"):
        if md.name != "index.md":
            assert "private-data-dir" not in md.read_text(), md.name
