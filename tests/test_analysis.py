"""The analysis end to end: a synthetic results folder written through ``study.results``,
read by ``analysis.load`` and drawn by ``python -m analysis.figures``; bad input refused."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from analysis import (
    figures,
    labels,
    layout,
    load,
    panel,
    plots_activations,
    plots_probes,
    plots_training,
    report,
    series,
    style,
    tables,
)
from analysis.synthetic import write_synthetic_study
from study import epoch_parts, results
from study.results import trial_id

ROOT = Path(__file__).resolve().parents[1]
FIGURES = (
    "fig1_activations",
    "fig2_noisy_bn",
    "fig3_gradients",
    "fig_accuracy_differences",
    "fig_lr_sensitivity",
    "fig_histograms",
    "fig_probes_ics",
    "fig_probes_landscape",
)
DIVERGED = trial_id("batch", 0.0, 0.01, 1)
RUNNING = trial_id("none", 0.0, 0.001, 2)
FAILED = trial_id("noisy_batch", 1.0, 0.01, 0)
OUTCOME = {DIVERGED: ("diverged", 2), RUNNING: ("running", 2), FAILED: ("error", 1)}


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = figures.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """3 variants (none, batch, noisy_batch at noise 0.5 and 1) × 2 lrs × 3 seeds × 3 epochs,
    with one diverged, one running and one failed trial, probes, and stray temporary files."""
    folder = tmp_path_factory.mktemp("results") / "study"
    rows = write_synthetic_study(
        folder, epochs=3, steps_per_epoch=100, hist_bins=32, probe_every=20, outcome=OUTCOME
    )
    # What a crash mid-write leaves behind: must be ignored, never read.
    (folder / "epochs" / ".x.tmp").write_bytes(b"half a file")
    (folder / "steps" / f"{RUNNING}.parquet{results.TMP_SUFFIX}").write_bytes(b"garbage")
    (folder / "layers" / ".hidden.parquet").write_bytes(b"garbage")
    code, stdout, stderr = run_main([str(folder)])
    return {"folder": folder, "rows": rows, "code": code, "stdout": stdout, "stderr": stderr}


# --------------------------------------------------------------------------- load


def test_load_joins_trial_configs_and_reports_incomplete_trials(study):
    s = load.load_study(study["folder"])
    assert len(s.trials) == 24
    assert s.variants == ["no BN", "BN", "noisy BN (noise 0.5)", "noisy BN (noise 1)"]
    assert s.lrs == [0.001, 0.01] and s.datasets == ["synthetic"]
    for table in (s.epochs, s.layers, s.steps.frame(), s.probes):
        assert set(load.JOIN_COLUMNS) <= set(table.columns)
    assert s.steps.frame()["grad_norm"].dtype == np.float32
    # Every trial's rows carry its own config.
    by_id = s.trials.set_index("trial_id")
    sample = s.epochs.drop_duplicates("trial_id")
    for row in sample.itertuples():
        assert by_id.loc[row.trial_id, "lr"] == row.lr
        assert by_id.loc[row.trial_id, "variant"] == row.variant
    running = s.epochs[s.epochs["trial_id"] == RUNNING]
    assert sorted(running["epoch"]) == [1, 2]
    text = " ".join(s.notices)
    assert "unfinished (running, or stopped" in text and RUNNING in text and "(2/3 epochs)" in text
    assert "diverged" in text and "error" in text and FAILED in text
    assert s.config["lrs"] == [0.001, 0.01]


def test_load_reads_only_requested_step_columns(study):
    s = load.load_study(study["folder"], step_columns=["grad_norm"])
    steps = s.steps.frame()
    assert "loss" not in steps.columns and "grad_norm" in steps.columns
    assert len(steps) == 100 * (3 * 21 + 2 + 2 + 1) == sum(s.steps.rows.values())


def test_planned_trials_without_rows_are_reported(tmp_path):
    folder = tmp_path / "r"
    rows = write_synthetic_study(
        folder, variants=(("batch", 0.0),), lrs=(0.001,), seeds=(0,), epochs=1, steps_per_epoch=5
    )
    (folder / "study.json").write_text(json.dumps({"trial_ids": [rows[0]["trial_id"], "ghost"]}))
    notices = " ".join(load.load_study(folder).notices)
    assert "1 of the study's 2 planned trials have not started: ghost" in notices


def test_files_of_trials_study_json_does_not_list_are_left_out(tmp_path):
    """Another grid run (or files copied) into the folder: with study.json's trial_ids, only
    the study's trials are read, as if the extra files were not there, and the user is told."""
    small = dict(variants=(("none", 0.0), ("batch", 0.0)), lrs=(0.001,), seeds=(0, 1), epochs=2,
                 steps_per_epoch=10, probe_every=5)
    folder, clean = tmp_path / "mixed", tmp_path / "clean"
    rows = write_synthetic_study(folder, **small)
    config = json.loads((folder / "study.json").read_text())
    config["trial_ids"] = [r["trial_id"] for r in rows]
    (folder / "study.json").write_text(json.dumps(config))
    shutil.copytree(folder, clean)
    extra = tmp_path / "extra"
    write_synthetic_study(extra, **{**small, "seeds": (7,)}, study_json=False, random_state=1)
    for path in extra.glob("*/*.parquet"):
        shutil.copy(path, folder / path.parent.name / path.name)
    extra_ids = sorted({p.stem for p in extra.glob("trials/*.parquet")})

    mixed, alone = load.load_study(folder), load.load_study(clean)
    for name in ("trials", "epochs", "layers", "steps", "probes"):
        pd.testing.assert_frame_equal(whole(mixed, name), whole(alone, name))
    opts = report.Options(results=folder, out=tmp_path / "unused", lr=0.001)
    pd.testing.assert_frame_equal(
        tables.accuracy_table(mixed, opts), tables.accuracy_table(alone, opts)
    )
    notice = [n for n in mixed.notices if "left out" in n]
    assert len(notice) == 1 and all(tid in notice[0] for tid in extra_ids)
    assert notice[0].startswith(f"{5 * len(extra_ids)} file(s) of {len(extra_ids)} trial(s)")
    assert not any("left out" in n for n in alone.notices)
    # Without trial_ids there is nothing to tell the study's files from others: all are read.
    del config["trial_ids"]
    (folder / "study.json").write_text(json.dumps(config))
    assert set(extra_ids) <= set(load.load_study(folder).trials["trial_id"])
    # A study.json listing none of the folder's trials: refused, not an empty study.
    (folder / "study.json").write_text(json.dumps({**config, "trial_ids": ["ghost"]}))
    code, _, err = run_main([str(folder), "--format", "png"])
    assert_refused(code, err, "trial_ids", str(folder / "study.json"))


def test_variant_labels():
    assert labels.variant_label("none", 0.0) == "no BN"
    assert labels.variant_label("batch", 0.0) == "BN"
    assert labels.variant_label("noisy_batch", 1.0) == "noisy BN (noise 1)"
    assert labels.variant_label("noisy_batch", 0.5) == "noisy BN (noise 0.5)"
    assert labels.variant_label("weight", 0.0) == "weight"  # a norm the registry does not know
    assert labels.variant_label("lp_batch", 0.0, p=1.0) == "ℓ1 BN"
    assert labels.variant_label("lp_batch", 0.0, p=float("inf")) == "ℓ∞ BN"
    assert labels.variant_label("group", 0.0, float("nan"), 8.0) == "GN (8 groups)"
    assert labels.variant_label("layer", 0.0, None, None) == "LN"


# --------------------------------------------------------------------------- figures


def test_every_figure_and_table_is_written(study):
    assert study["code"] == 0, study["stderr"]
    out = study["folder"] / "figures"
    for name in FIGURES:
        for fmt in ("png", "pdf"):
            path = out / f"{name}.{fmt}"
            assert path.is_file() and path.stat().st_size > 1000, path
    for name in (
        "accuracy_table.md",
        "accuracy_table.csv",
        "accuracy_table.tex",
        "gradient_stability.md",
        "gradient_stability.csv",
        "gradient_stability.tex",
        "gradient_stability_runs.csv",
        "comparisons.md",
        "probe_window.csv",
        "probe_window_summary.csv",
        "probe_comparisons.csv",
        "weight_norms.csv",
        "batch_spread.csv",
        "index.md",
        "index.html",
    ):
        assert (out / name).is_file()
    # One progress line per figure, table (accuracy, stability, comparisons), summary (probe
    # window, probe comparisons, weight norms, batch spread), and the index at the end. The study's runs are 3
    # epochs long, the seed's 10: no seed comparison, and one line says why.
    lines = study["stdout"].splitlines()
    assert sum(line.startswith("wrote ") for line in lines) == len(FIGURES) + 7
    assert lines[-1].startswith("index: ")
    assert not list(out.glob("seed_comparison.*"))
    (why,) = [line for line in lines if line.startswith("notice: seed_comparison skipped: ")]
    assert "no finished runs at the seed's settings (lr 0.001, 10 epochs" in why
    index = (out / "index.md").read_text()
    html = (out / "index.html").read_text()
    for name in FIGURES:
        assert f"{name}.png" in index and f"{name}.png" in html
    titles = [line for line in index.splitlines() if line.startswith("![")]
    assert len(titles) == len(FIGURES) == len({t.split("](")[0] for t in titles})  # no title twice
    assert "Student-t" in index and "synthetic" in index and RUNNING in index
    assert "## Gradient stability" in index and "<th>median |Δ log ‖g‖|</th>" in html


def test_accuracy_table_equals_hand_computation(study):
    table = pd.read_csv(study["folder"] / "figures" / "accuracy_table.csv")
    rows = pd.DataFrame(study["rows"])
    rows["variant"] = [
        labels.variant_label(n, z) for n, z in zip(rows["norm"], rows["noise"], strict=True)
    ]
    assert len(table) == 8
    for r in table.itertuples():
        group = rows[(rows["variant"] == r.variant) & np.isclose(rows["lr"], r.lr)]
        done = group[group["status"] == "done"]
        assert r.n == len(done)
        assert r.diverged == (group["status"] == "diverged").sum()
        assert r.error == (group["status"] == "error").sum()
        assert r.running == (group["status"] == "running").sum()
        for metric in ("train", "val", "test"):
            values = 100 * done[f"final_{metric}_acc"].to_numpy()
            n = len(values)
            half = stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / np.sqrt(n)
            assert getattr(r, f"{metric}_mean") == pytest.approx(values.mean(), rel=1e-9)
            assert getattr(r, f"{metric}_hw") == pytest.approx(half, rel=1e-9)
    # The diverged trial is counted but its numbers are not in the mean.
    bn = table[(table["variant"] == "BN") & np.isclose(table["lr"], 0.01)].iloc[0]
    assert bn["n"] == 2 and bn["diverged"] == 1
    md = (study["folder"] / "figures" / "accuracy_table.md").read_text()
    first = table.iloc[0]
    assert f"{first['test_mean']:.2f} ± {first['test_hw']:.2f}" in md
    assert "Diverged runs" in md and "excluded" in md
    assert "\\pm" in (study["folder"] / "figures" / "accuracy_table.tex").read_text()


def test_gradient_stability_table_equals_hand_computation(study):
    """Per done run, over its steps after the first epoch (the study has 3): the median norm,
    std ÷ mean, median |difference of logs| between consecutive steps, max ÷ median; then the
    mean and Student-t half-width over runs, per variant and lr."""
    table = pd.read_csv(study["folder"] / "figures" / "gradient_stability.csv")
    steps = pd.concat(pd.read_parquet(f) for f in sorted((study["folder"] / "steps").glob("*.parquet")))
    rows = pd.DataFrame(study["rows"])
    rows["variant"] = [labels.variant_label(n, z) for n, z in zip(rows["norm"], rows["noise"], strict=True)]
    per_run = {}
    runs_csv = pd.read_csv(study["folder"] / "figures" / "gradient_stability_runs.csv").set_index("trial_id")
    for tid, run in steps[steps["epoch"] >= 2].groupby("trial_id"):
        for suffix, column in (("", "grad_norm"), ("_conv2", "grad_norm_conv2")):
            g = run.sort_values("step")[column].to_numpy(dtype=np.float64)
            g = g[np.isfinite(g) & (g > 0)]
            got = dict(median_norm=np.median(g), cv=np.std(g) / np.mean(g),
                       step_change=np.median(np.abs(np.log(g[1:] / g[:-1]))),
                       max_over_median=g.max() / np.median(g))
            for metric, value in got.items():  # each run's row, a layer's columns too
                assert runs_csv.loc[tid, f"{metric}{suffix}"] == pytest.approx(value, rel=1e-9)
            per_run.setdefault(tid, got)
    assert len(table) == 8
    for r in table.itertuples():
        group = rows[(rows["variant"] == r.variant) & np.isclose(rows["lr"], r.lr)]
        done = group[group["status"] == "done"]["trial_id"]
        assert r.n == len(done)
        for metric in ("median_norm", "cv", "step_change", "max_over_median"):
            values = np.array([per_run[t][metric] for t in done])
            assert getattr(r, f"{metric}_mean") == pytest.approx(values.mean(), rel=1e-9)
            if len(values) > 1:
                half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
                hw = (getattr(r, f"{metric}_hi") - getattr(r, f"{metric}_lo")) / 2
                assert hw == pytest.approx(half, rel=1e-9)
    md = (study["folder"] / "figures" / "gradient_stability.md").read_text()
    assert "after the first epoch" in md and f"{table.iloc[0]['cv_mean']:.3f} ± " in md
    assert "$\\Delta$" in (study["folder"] / "figures" / "gradient_stability.tex").read_text()


def test_a_cell_over_fewer_runs_than_n_gives_its_own_n(tmp_path):
    """Two of three done runs without a finite test accuracy: the cell is the one run's value,
    marked n=1, with no interval (not a zero-width one read as over 3 runs)."""
    folder = tmp_path / "nan"
    write_synthetic_study(folder, variants=(("batch", 0.0),), lrs=(1e-3,), epochs=2,
                          steps_per_epoch=10, hist_bins=8)
    for seed in (1, 2):
        path = results.table_path(folder, "epochs", trial_id("batch", 0.0, 1e-3, seed))
        rows = results.read_table_file(path).to_pylist()
        rows[-1]["test_acc"] = float("nan")
        results.write_atomic(results.to_arrow("epochs", rows), path)
    code, _, err = run_main([str(folder), "--out", str(tmp_path / "fig"), "--format", "png"])
    assert code == 0, err
    table = pd.read_csv(tmp_path / "fig" / "accuracy_table.csv").iloc[0]
    assert table["n"] == 3 and table["test_n"] == 1 and table["train_n"] == 3
    one = pd.read_parquet(results.table_path(folder, "epochs", trial_id("batch", 0.0, 1e-3, 0)))
    row = (tmp_path / "fig" / "accuracy_table.md").read_text().splitlines()[4]
    assert f"| {100 * one['test_acc'].iloc[-1]:.2f} (n=1) |" in row, row
    assert row.count(" ± ") == 2  # train and validation, over the 3 runs


def test_bootstrap_table_shows_its_interval_not_a_half_width(study, tmp_path):
    """A percentile bootstrap interval need not be symmetric about the mean: the table shows it."""
    out = tmp_path / "boot"
    code, _, err = run_main([str(study["folder"]), "--ci", "bootstrap", "--out", str(out), "--format", "png"])
    assert code == 0, err
    table = pd.read_csv(out / "accuracy_table.csv")
    md = (out / "accuracy_table.md").read_text()
    shown = 0
    for r in table[table["n"] > 1].itertuples():
        assert f"{r.test_mean:.2f} [{r.test_lo:.2f}, {r.test_hi:.2f}]" in md
        shown += 1
    assert shown and "Mean [interval] of the" in md and " ± " not in md.split("\n\n")[0]
    assert "$ [" in (out / "accuracy_table.tex").read_text()


def test_noise_levels_go_from_light_to_dark():
    """Several noise magnitudes of one norm: distinct colours whose relative luminance (WCAG's
    definition) falls as the noise grows; a norm with one magnitude keeps its own colour."""
    import matplotlib.colors as mcolors

    trials = pd.DataFrame(dict(
        variant=["BN", "n4", "n0.5", "n2", "n1", "no BN"],
        norm=["batch", "noisy_batch", "noisy_batch", "noisy_batch", "noisy_batch", "none"],
        noise=[0.0, 4.0, 0.5, 2.0, 1.0, 0.0]))
    styles = style.variant_styles(trials)

    def luminance(color) -> float:
        lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in mcolors.to_rgb(color)]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    lum = [luminance(styles[v].color) for v in ("n0.5", "n1", "n2", "n4")]
    assert all(a > b for a, b in zip(lum, lum[1:], strict=False)), lum
    assert mcolors.to_hex(styles["BN"].color) == results.VARIANTS["batch"].color.lower()
    assert mcolors.to_hex(styles["no BN"].color) == results.VARIANTS["none"].color.lower()
    one = style.variant_styles(trials[trials["variant"].isin(["BN", "n1"])])
    assert mcolors.to_hex(one["n1"].color) == results.VARIANTS["noisy_batch"].color.lower()


def test_one_epoch_gets_an_error_bar_and_one_whole_tick(tmp_path):
    """One x position has no area for a band to fill: its interval is an error bar, and the
    axis has one tick at the epoch rather than fractional ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = style.variant_styles(pd.DataFrame(
        dict(variant=["BN", "no BN"], norm=["batch", "none"], noise=[0.0, 0.0])))
    est = pd.DataFrame(dict(variant=["BN", "no BN"], epoch=[1, 1], mean=[0.5, 0.2],
                            lo=[0.4, 0.2], hi=[0.7, 0.2], n=[3, 1]))
    fig, ax = plt.subplots()
    panel.draw_bands(ax, est, styles, "epoch", markers=True)
    panel.integer_ticks(ax)
    bars = [c for c in ax.containers if isinstance(c, matplotlib.container.ErrorbarContainer)]
    assert len(bars) == 1  # BN's; no BN has n = 1, so no interval
    (segment,) = bars[0].lines[2][0].get_segments()
    np.testing.assert_allclose(segment, [[0.94, 0.4], [0.94, 0.7]])  # BN, dodged left of no BN
    assert list(ax.get_xticks()) == [1.0]
    plt.close(fig)
    folder = tmp_path / "one_epoch"  # and the whole command on a one-epoch study
    write_synthetic_study(folder, epochs=1, steps_per_epoch=20, hist_bins=16, probe_every=0)
    code, _, err = run_main([str(folder), "--format", "png"])
    assert code == 0, err


def test_histogram_caption_says_which_batches_were_counted(study):
    """Trials count every hist_every-th batch into their histograms (study.stats)."""
    from types import SimpleNamespace

    def words(*every):
        configs = [json.dumps({"hist_every": k}) if k else json.dumps({}) for k in every]
        trials = pd.DataFrame({"config_json": configs})
        return plots_activations._histogram_batches(SimpleNamespace(trials=trials))

    assert words(50, 50) == "every 50th training batch (hist_every)"
    assert words(1) == "every training batch"
    assert "sample" in words(50, 10) and "sample" in words(None)
    index = (study["folder"] / "figures" / "index.md").read_text()
    assert "every hist_every-th" in index  # the synthetic study's configs do not say


def test_a_missing_epochs_table_is_named_in_the_skip_notice(study, tmp_path):
    import shutil

    folder = tmp_path / "no_epochs"
    shutil.copytree(study["folder"], folder, ignore=shutil.ignore_patterns("figures"))
    shutil.rmtree(folder / "epochs")
    code, out, err = run_main([str(folder), "--format", "png"])
    assert code == 0, err
    notice = next(line for line in (out + err).splitlines() if "fig2_noisy_bn skipped" in line)
    assert "epochs table" in notice and "diverged" not in notice


def test_diverged_marks_sit_below_every_accuracy_drawn(study, tmp_path, monkeypatch):
    """A diverged run's cross goes in a strip under the data, never among the points."""
    drawn = {}
    monkeypatch.setattr(layout.Sheet, "save", lambda sheet, name, *a, **k: drawn.setdefault(name, sheet.fig))
    loaded = load.load_study(study["folder"])
    opts = report.Options(results=study["folder"], out=tmp_path, lr=loaded.lrs[0])
    plots_training.fig_lr_sensitivity(loaded, opts, style.variant_styles(loaded.trials), report.Report())
    def screen_y(artist, xy):  # height on the figure, whatever coordinates the artist uses
        return artist.get_transform().transform(np.asarray(xy, dtype=float))[:, 1]

    for ax in drawn["fig_lr_sensitivity"].axes:
        crosses = [ln for ln in ax.lines if ln.get_marker() == "x"]
        assert crosses
        low = min(
            [screen_y(c, p.vertices).min() for c in ax.collections for p in c.get_paths()]
            + [screen_y(ln, ln.get_xydata()).min() for ln in ax.lines if ln.get_marker() != "x"])
        assert all(screen_y(ln, ln.get_xydata()).max() < low for ln in crosses)
        tick_low = ax.transData.transform([[1, min(ax.get_yticks())]])[0, 1]
        assert tick_low >= low - 1e-6  # no accuracy ticks in the strip


def test_a_variant_with_no_finished_run_is_named_as_not_drawn(tmp_path):
    folder = tmp_path / "no_bn_left"
    outcome = {trial_id("none", 0.0, 0.001, s): ("diverged", 1) for s in range(3)}
    write_synthetic_study(folder, epochs=2, steps_per_epoch=20, hist_bins=16, probe_every=0,
                          outcome=outcome)
    code, _, err = run_main([str(folder), "--format", "png"])
    assert code == 0, err
    index = (folder / "figures" / "index.md").read_text()
    fig1 = index[index.index("Figure 1"):index.index("Figure 2")]
    assert "Not drawn, as none of its runs finished: no BN." in fig1


def test_probe_figures_draw_each_layer_and_step_mean_over_seeds(study, tmp_path, monkeypatch):
    """The ICS panels are conv2..fc2 in order, each line the per-step mean over seeds of that
    layer's values; the landscape lines are the per-step means of a per-model value (stored on
    every layer's row), not their sum. Reference: the loaded probes table, grouped in pandas."""
    drawn = {}
    monkeypatch.setattr(layout.Sheet, "save", lambda sheet, name, *a, **k: drawn.setdefault(name, sheet.fig))
    loaded = load.load_study(study["folder"])
    lr = min(loaded.lrs)
    opts = report.Options(results=study["folder"], out=tmp_path, lr=lr)
    styles = style.variant_styles(loaded.trials)
    plots_probes.fig_probes_ics(loaded, opts, styles, report.Report())
    plots_probes.fig_probes_landscape(loaded, opts, styles, report.Report())
    probes = loaded.probes[np.isclose(loaded.probes["lr"], lr)
                           & loaded.probes["status"].isin(["done", "running"])]

    def line(ax, variant):
        (ln,) = [ln for ln in ax.lines if ln.get_label() == variant]
        return pd.Series(ln.get_ydata(), index=ln.get_xdata())

    ics = drawn["fig_probes_ics"].axes
    layers = [name for name in results.PROBE_LAYERS if name != "conv1"]
    assert [ax.get_title().split(":")[0] for ax in ics[: len(layers)]] == layers
    ref = probes.groupby(["variant", "layer", "step"], observed=True)["ics_l2"].mean()
    for ax, layer in zip(ics[: len(layers)], layers, strict=True):
        for variant in ("BN", "no BN"):
            want = ref.loc[(variant, layer)]
            got = line(ax, variant)
            np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-12)
            assert got.index.tolist() == want.index.astype(float).tolist()
    landscape = drawn["fig_probes_landscape"].axes
    per_step = probes.groupby(["variant", "trial_id", "step"], observed=True)["grad_pred"].first()
    want = per_step.loc["BN"].groupby("step").mean()
    np.testing.assert_allclose(line(landscape[2], "BN").to_numpy(), want.to_numpy(), rtol=1e-12)
    # beside the raw loss range, the loss change beyond the first-order term, per step its
    # mean over seeds of the per-step value
    per_step = probes.groupby(["variant", "trial_id", "step"], observed=True)["loss_dev_max"].first()
    want = per_step.loc["BN"].groupby("step").mean()
    np.testing.assert_allclose(line(landscape[1], "BN: loss_dev_max").to_numpy(), want.to_numpy(),
                               rtol=1e-12)
    assert "first order" in landscape[1].get_title()


def test_tex_escape_makes_every_special_character_literal():
    assert tables.tex_escape(r"a_b & 5% #1 $x$ {y} ~z ^w \ ± – |Δ‖ℓ÷") == (
        r"a\_b \& 5\% \#1 \$x\$ \{y\} \textasciitilde{}z \textasciicircum{}w "
        r"\textbackslash{} $\pm$ -- $|$$\Delta$$\|$$\ell$$\div$")


def test_missing_variant_skips_its_figure_and_draws_the_rest(tmp_path):
    folder = tmp_path / "no_none"
    write_synthetic_study(
        folder,
        variants=(("batch", 0.0), ("noisy_batch", 1.0)),
        lrs=(0.001, 0.01),
        seeds=(0, 1),
        epochs=2,
        steps_per_epoch=50,
        study_json=False,
    )
    out = tmp_path / "out"
    code, stdout, _ = run_main(
        [str(folder), "--out", str(out), "--ci", "bootstrap", "--format", "png", "--lr", "0.01"]
    )
    assert code == 0
    assert not (out / "fig1_activations.png").exists()
    assert "fig1_activations skipped" in stdout
    index = (out / "index.md").read_text()
    assert "fig1_activations skipped" in index and "bootstrap" in index
    for name in ("fig2_noisy_bn", "fig3_gradients", "fig_lr_sensitivity", "fig_histograms"):
        assert (out / f"{name}.png").exists() and not (out / f"{name}.pdf").exists()
    assert "fig_probes_ics skipped: no probes recorded" in index


def test_trailing_mean_matches_pandas_rolling_whatever_the_sum_carried_in():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"g": np.repeat([0, 1, 2], [7, 1, 12]), "v": rng.normal(size=20)})
    frame.loc[3, "v"] = np.nan
    ref = frame.groupby("g")["v"].transform(lambda s: s.rolling(4, min_periods=1).mean())
    carry = 0.0
    for g, part in frame.groupby("g"):
        got, carry = series.trailing_mean(part["v"].to_numpy(), 4, carry)
        np.testing.assert_allclose(got, ref[frame["g"] == g].to_numpy(), rtol=1e-12)
    assert carry == pytest.approx(frame["v"].sum())


def test_step_smoothing_spans_the_same_steps_whatever_grad_every():
    """--smooth counts training steps: a trial logging every 4th step averages over 2 rows for
    a window of 8 steps, one logging every step over 8 (pandas rolling as the reference)."""
    rng = np.random.default_rng(1)
    ids = pd.Categorical(["every1"] * 64 + ["every4"] * 16)
    steps = pd.DataFrame({
        "trial_id": ids, "variant": pd.Categorical(["BN"] * 80), "seed": 0, "lr": 0.01,
        "status": "done", "step": np.r_[np.arange(64), np.arange(0, 64, 4)],
        "grad_norm": rng.normal(size=80)})
    every = pd.Series({"every1": 1, "every4": 4})
    got = series.smoothed_step_curves(steps, ["grad_norm"], 8, every, max_points=1000)
    for tid, rows in (("every1", 8), ("every4", 2)):
        mine = steps[steps["trial_id"] == tid]
        ref = mine["grad_norm"].rolling(rows, min_periods=1).mean().to_numpy()
        curve = got[got["trial_id"] == tid].sort_values("step")
        assert curve["step"].tolist() == mine["step"].astype(float).tolist()
        np.testing.assert_allclose(curve["grad_norm"], ref, rtol=1e-12)


def test_running_trials_are_drawn_and_the_default_lr_is_the_smallest(study):
    """A running trial's epochs so far are in the curves (they end early); with no --lr the
    single-lr figures use the study's smallest learning rate."""
    loaded = load.load_study(study["folder"])
    ok = series.drawable(loaded.epochs)
    assert RUNNING in set(ok["trial_id"].astype(str))
    assert DIVERGED not in set(ok["trial_id"].astype(str))
    index = (study["folder"] / "figures" / "index.md").read_text()
    assert f"Learning rate {labels.format_number(min(loaded.lrs))} (the smallest in the study" in index


def test_histogram_densities_integrate_to_one_on_mixed_bins():
    layers = pd.DataFrame(
        {
            "hist_lo": [-8.0, -4.0],
            "hist_hi": [8.0, 4.0],
            "hist": [[0, 5, 10, 5], [1, 2, 3, 4, 5, 6, 7, 8]],
        }
    )
    edges, dens = series.histogram_densities(layers)
    assert edges[0] == -8 and edges[-1] == 8
    np.testing.assert_allclose((dens * np.diff(edges)).sum(axis=1), 1.0)
    # by hand: the second row's inner bins [-3, -2] ... [2, 3] fall into the common bins of
    # width 2; its outer bins hold values clamped into them, which stay in the outer bins
    np.testing.assert_allclose(dens[1] * 2 * 36, [1, 0, 2, 3 + 4, 5 + 6, 7, 0, 8])
    np.testing.assert_allclose(dens[0] * 2 * 20, [0, 0, 2.5, 2.5, 5, 5, 0, 5])


def test_import_loads_neither_torch_nor_ray():
    code = (
        "import sys, analysis.figures, analysis.load, analysis.bands, analysis.synthetic, analysis.tables\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray'))\n"
        "print(bad)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# --------------------------------------------------------------------------- several folders


def parts_by_seed(folder: Path, dest: Path, seed_sets: list[set[int]]) -> list[Path]:
    """The study's trial files copied into one folder per set of seeds, each with a study.json
    naming its trials: a study run in parts."""
    parts = []
    for i, seeds in enumerate(seed_sets):
        part = dest / f"part{i}"
        ids = [f.stem for f in sorted((folder / "trials").glob("*.parquet"))
               if pq.read_table(f, columns=["seed"])["seed"][0].as_py() in seeds]
        for table in results.TABLES:
            (part / table).mkdir(parents=True)
            for tid in ids:
                if (folder / table / f"{tid}.parquet").exists():
                    shutil.copy(folder / table / f"{tid}.parquet", part / table)
        (part / "study.json").write_text(json.dumps({"name": f"part{i}", "trial_ids": ids}))
        parts.append(part)
    return parts


def test_several_folders_are_drawn_as_the_study_they_split(study, tmp_path):
    parts = parts_by_seed(study["folder"], tmp_path, [{0}, {1, 2}])
    out = tmp_path / "together"
    code, stdout, stderr = run_main([*map(str, parts), "--out", str(out), "--format", "png"])
    assert code == 0, stderr
    whole = study["folder"] / "figures"  # the same trials, drawn from one folder
    for name in ("accuracy_table.csv", "gradient_stability.csv", "gradient_stability_runs.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / name), pd.read_csv(whole / name))
    for name in FIGURES:
        assert (out / f"{name}.png").read_bytes() == (whole / f"{name}.png").read_bytes(), name
    index = (out / "index.md").read_text()
    assert f"**results folders**: {parts[0]}, {parts[1]}" in index
    assert "**part1/study.json: trial_ids**" in index and "# BatchNorm study: part0 + part1" in index

    # folders of one name (copied from two clusters) are told apart by their paths
    same = [tmp_path / "c1" / "results", tmp_path / "c2" / "results"]
    for part, copy in zip(parts, same, strict=True):
        shutil.copytree(part, copy)
    assert load.load_studies(same).labels == [str(same[0]), str(same[1])]
    assert load.load_studies(parts).labels == ["part0", "part1"]


def test_several_folders_that_are_not_one_study_are_refused(study, tmp_path):
    overlap = parts_by_seed(study["folder"], tmp_path / "overlap", [{0, 1}, {1, 2}])
    code, _, err = run_main([*map(str, overlap), "--out", str(tmp_path / "out")])
    assert_refused(code, err, "is in both", str(overlap[0]), str(overlap[1]), "--extend")

    a, b = parts_by_seed(study["folder"], tmp_path / "stray", [{0}, {1, 2}])
    (b / "study.json").unlink()  # so every file in b is read: one is a trial of a's
    stray = next((a / "epochs").glob("*.parquet"))
    shutil.copy(stray, b / "epochs")
    code, _, err = run_main([str(a), str(b), "--out", str(tmp_path / "out")])
    assert_refused(code, err, f"trial {stray.stem} is in both")

    a, b = parts_by_seed(study["folder"], tmp_path / "epochs", [{0}, {1, 2}])
    for path in (b / "trials").glob("*.parquet"):  # part b's trials ran for 5 epochs
        table = pq.read_table(path)
        epochs = pa.array([5] * len(table), pa.int64())
        pq.write_table(table.set_column(table.schema.get_field_index("epochs"), "epochs", epochs), path)
    code, _, err = run_main([str(a), str(b), "--out", str(tmp_path / "out")])
    assert_refused(code, err, "differ in epochs", f"{a}: 3", f"{b}: 5")

    a, b = parts_by_seed(study["folder"], tmp_path / "config", [{0}, {1, 2}])
    for path in (b / "trials").glob("*.parquet"):  # b's histograms had 64 bins (config_json)
        table = pq.read_table(path)
        configs = [json.dumps({**json.loads(c), "hist_bins": 64}) for c in table["config_json"].to_pylist()]
        column = table.schema.get_field_index("config_json")
        pq.write_table(table.set_column(column, "config_json", pa.array(configs, pa.string())), path)
    code, _, err = run_main([str(a), str(b), "--out", str(tmp_path / "out")])
    assert_refused(code, err, "differ in hist_bins", f"{b}: 64")

    code, _, err = run_main([str(a), str(b)])
    assert_refused(code, err, "--out DIR")
    code, _, err = run_main([str(a), str(a), "--out", str(tmp_path / "out")])
    assert_refused(code, err, f"{a} is given twice")
    (tmp_path / "link").symlink_to(a)
    code, _, err = run_main([str(a), str(tmp_path / "link"), "--out", str(tmp_path / "out")])
    assert_refused(code, err, f"{tmp_path / 'link'} is the same folder as {a}")
    assert not (tmp_path / "out").exists()
    assert not (a / "figures").exists() and not (b / "figures").exists()


# --------------------------------------------------------------------------- bad input


def assert_refused(code: int, stderr: str, *words: str) -> None:
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_missing_folder_is_refused_from_the_command_line(tmp_path):
    missing = tmp_path / "nope"
    proc = subprocess.run(
        [sys.executable, "-m", "analysis.figures", str(missing)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert_refused(proc.returncode, proc.stderr, "does not exist")
    assert not missing.exists()


@pytest.mark.parametrize("kind", ["empty", "only_tmp", "trials_missing"])
def test_folder_without_results_is_refused(tmp_path, kind):
    folder = tmp_path / "r"
    folder.mkdir()
    if kind == "only_tmp":
        (folder / "epochs").mkdir()
        (folder / "epochs" / ".a.tmp").write_bytes(b"x")
    if kind == "trials_missing":
        epoch_parts.write_epoch_rows(
            folder, "epochs", "t1", results.to_arrow("epochs", [{"trial_id": "t1", "epoch": 1}])
        )
    code, _, err = run_main([str(folder)])
    assert_refused(code, err, str(folder))
    assert not (folder / "figures").exists()


def test_an_output_that_cannot_be_written_is_one_line_and_exit_2(study, tmp_path):
    """Where --out cannot be made, and where a file of it is blocked (a folder in its place)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("precious")
    code, _, err = run_main([str(study["folder"]), "--out", str(blocker / "figures")])
    assert_refused(code, err, "cannot write to", "a_file")
    assert blocker.read_text() == "precious"
    out = tmp_path / "figs"
    (out / "accuracy_table.csv").mkdir(parents=True)
    code, _, err = run_main([str(study["folder"]), "--out", str(out), "--format", "png"])
    assert_refused(code, err, "cannot write", "accuracy_table.csv")


def test_a_folder_of_studies_is_refused_with_the_studies_named(study):
    """`python -m analysis.figures results/` where results/ holds study folders (`make demo`'s
    results/demo): the message says which folders to pass."""
    parent = study["folder"].parent
    code, _, err = run_main([str(parent)])
    assert_refused(code, err, "pass one of them")
    assert str(study["folder"]) in err
    assert not (parent / "figures").exists()


def test_corrupt_file_is_refused_and_named(study, tmp_path):
    folder = tmp_path / "corrupt"
    write_synthetic_study(
        folder, variants=(("batch", 0.0),), lrs=(0.001,), seeds=(0,), epochs=1, steps_per_epoch=10
    )
    bad = folder / "layers" / "broken.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    code, _, err = run_main([str(folder)])
    assert_refused(code, err, str(bad))
    assert not (folder / "figures").exists()


def test_unknown_schema_version_is_refused(tmp_path):
    folder = tmp_path / "future"
    write_synthetic_study(
        folder, variants=(("batch", 0.0),), lrs=(0.001,), seeds=(0,), epochs=1, steps_per_epoch=10
    )
    path = results.table_path(folder, "epochs", trial_id("batch", 0.0, 0.001, 0))
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    meta[results.VERSION_KEY] = b"99"
    pq.write_table(table.replace_schema_metadata(meta), path)
    code, _, err = run_main([str(folder)])
    assert_refused(code, err, "schema version 99", str(path))
    assert not (folder / "figures").exists()


def test_a_foreign_parquet_file_is_refused_and_named(tmp_path):
    """A Parquet file that is not ours (no trial_id column) is refused in one line naming it."""
    folder = tmp_path / "foreign"
    write_synthetic_study(
        folder, variants=(("batch", 0.0),), lrs=(0.001,), seeds=(0,), epochs=1, steps_per_epoch=10
    )
    bad = folder / "trials" / "zzz.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), bad)
    code, _, err = run_main([str(folder)])
    assert_refused(code, err, str(bad), "not a bnstudy results file")
    assert not (folder / "figures").exists()


def test_ctrl_c_gives_one_line_exit_130_and_keeps_what_was_written(study, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(figures, "FIGURES", tuple(
        (name, interrupted if name == "fig2_noisy_bn" else draw) for name, draw in figures.FIGURES))
    out = tmp_path / "figs"
    try:
        code, _, err = run_main([str(study["folder"]), "--out", str(out), "--format", "png"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped figures.main")
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"{figures.PROG}: interrupted; the files written so far in {out} are kept, "
        "but its index is not up to date"
    ]
    assert (out / "fig1_activations.png").is_file() and (out / "accuracy_table.csv").is_file()
    assert not (out / "index.html").exists()
    # Interrupted while reading, before anything is written: it says so.
    monkeypatch.setattr(figures, "load_studies", interrupted)
    code, _, err = run_main([str(study["folder"]), "--out", str(tmp_path / "none")])
    assert code == 130 and err == f"{figures.PROG}: interrupted; nothing was written\n"
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--level", "1.5"], "between 0 and 1"),
        (["--level", "abc"], "not a number"),
        (["--ci", "bca"], "invalid choice"),
        (["--smooth", "0"], "at least 1"),
        (["--format", "gif"], "png, pdf"),
        (["--lr", "-1"], "positive"),
        (["--lr", "-1e-3"], "positive"),
        (["--lr", "0.02"], "not in the study"),
        (["--window", "30:10"], "START < END"),
        (["--window", "10"], "START:END"),
        (["--bogus"], "unrecognized"),
    ],
)
def test_bad_flag_values_are_refused(study, tmp_path, flags, words):
    out = tmp_path / "out"
    code, _, err = run_main([str(study["folder"]), "--out", str(out), *flags])
    assert_refused(code, err, words)
    assert not out.exists()


def test_help_explains_every_flag_with_its_default(capsys):
    assert figures.main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--ci", "--level", "--lr", "--smooth", "--format", "--window"):
        assert flag in text
    assert text.count("default") >= 7


def test_study_json_is_optional_and_shown(study, tmp_path):
    index = (study["folder"] / "figures" / "index.md").read_text()
    assert "study.json: preset" in index
    config = json.loads((study["folder"] / "study.json").read_text())
    assert config["epochs"] == 3


@pytest.mark.parametrize("lo,hi", [(0.5, 2.0), (0.1, 50.0), (1e-4, 10.0), (1e-3, float("inf"))])
def test_log_axes_draw_over_any_range(lo, hi):
    """A log axis over any range, up to many decades (a diverging trial's variance) or an
    infinite top, draws with plain positive tick labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.panel import plain_log

    fig, ax = plt.subplots()
    ax.plot([0, 1], [lo, hi if np.isfinite(hi) else 1e6])
    plain_log(ax, lo, hi)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert labels and all(float(x) > 0 for x in labels)
    plt.close(fig)


def whole(study: load.Study, table: str) -> pd.DataFrame:
    """``study``'s ``table`` as one DataFrame (the steps table is read a trial at a time)."""
    return study.steps.frame() if table == "steps" else getattr(study, table)


def _tables_of(folder: Path, out: Path) -> dict[str, bytes]:
    """accuracy_table.csv, gradient_stability.csv and comparisons.csv of ``folder``, as
    ``python -m analysis.figures`` writes them (its ``run`` without the figures)."""
    study = load.load_study(folder)
    opts = report.Options(results=folder, out=out)
    out.mkdir()
    rep = report.Report()
    figures.write_accuracy_table(figures.accuracy_table(study, opts), study, opts, rep)
    stability = figures.stability_runs(study)
    figures.write_stability_table(*figures.stability_table(study, opts, stability), study, opts, rep)
    figures.write_comparisons(*figures.comparisons(figures.run_values(study, stability), opts.level),
                              study, opts, rep, stability[1])
    return {n: (out / n).read_bytes()
            for n in ("accuracy_table.csv", "gradient_stability.csv", "comparisons.csv")}


def test_a_study_left_in_per_epoch_files_reads_and_tables_as_its_compacted_copy(tmp_path):
    """The same study written by the writer as a running study leaves it (one file per trial,
    table and epoch), compacted (one file per trial and table), and compacted with a resumed
    trial's newer epochs on top: the same tables read, the same bytes written."""
    kw = dict(variants=(("none", 0.0), ("batch", 0.0), ("noisy_batch", 1.0)), lrs=(1e-3, 1e-2),
              seeds=(0, 1, 2), epochs=3, steps_per_epoch=30, hist_bins=8, probe_every=10,
              outcome={DIVERGED: ("diverged", 2), RUNNING: ("running", 2), FAILED: ("error", 1)})
    write_synthetic_study(tmp_path / "compacted", **kw)
    write_synthetic_study(tmp_path / "parts", compact=False, **kw)
    shutil.copytree(tmp_path / "compacted", tmp_path / "resumed")
    tid = trial_id("batch", 0.0, 1e-3, 0)
    for table in results.EPOCH_TABLES:  # its last epoch again, now as a part
        rows = results.read_table_file(results.table_path(tmp_path / "resumed", table, tid))
        epoch_parts.write_epoch_rows(tmp_path / "resumed", table, tid,
                                     rows.filter(pa.compute.equal(rows["epoch"], 3)))
    assert not list((tmp_path / "parts" / "steps").glob("*.parquet"))
    assert not [p for p in (tmp_path / "compacted" / "steps").iterdir() if p.is_dir()]

    reference = load.load_study(tmp_path / "compacted")
    assert len(whole(reference, "steps")) and len(reference.probes)
    for name in ("parts", "resumed"):
        got = load.load_study(tmp_path / name)
        for table in ("trials", "epochs", "layers", "steps", "probes"):
            pd.testing.assert_frame_equal(whole(got, table), whole(reference, table),
                                          check_exact=True, obj=f"{name}: {table}")
        assert got.notices == reference.notices
    expected = _tables_of(tmp_path / "compacted", tmp_path / "out-compacted")
    for name in ("parts", "resumed"):
        assert _tables_of(tmp_path / name, tmp_path / f"out-{name}") == expected


def test_two_folders_of_one_study_left_in_per_epoch_files_read_as_their_compacted_copies(tmp_path):
    """Seeds run apart, both still in per-epoch files (each trial's parts share their names
    with every other trial's): one study, as their compacted copies read."""
    kw = dict(variants=(("none", 0.0), ("batch", 0.0)), lrs=(1e-2,), epochs=2, steps_per_epoch=20,
              hist_bins=8)
    for kind, compact in (("parts", False), ("compacted", True)):
        write_synthetic_study(tmp_path / kind / "a", seeds=(0, 1), compact=compact, **kw)
        write_synthetic_study(tmp_path / kind / "b", seeds=(2,), compact=compact, random_state=1, **kw)
    got = load.load_studies([tmp_path / "parts" / "a", tmp_path / "parts" / "b"])
    reference = load.load_studies([tmp_path / "compacted" / "a", tmp_path / "compacted" / "b"])
    assert sorted(got.trials["seed"].unique()) == [0, 1, 2]
    for table in ("trials", "epochs", "layers", "steps"):
        pd.testing.assert_frame_equal(whole(got, table), whole(reference, table), check_exact=True)
