"""The numbers drawn in figures 1-3 and the histogram figure, checked against the loaded tables.

Each figure is drawn from a small synthetic study (``_finish`` patched to keep the Figure) and
every panel's lines and bands are compared with a reference computed here from the loaded
tables with pandas and scipy, following the figure's caption: lines are the mean over seeds,
bands the Student-t interval of that mean (``scipy.stats.t.interval``) at the chosen level,
per variant and x position; no band where n = 1.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from scipy import stats  # noqa: E402

from analysis import layout, load, plots_activations, plots_training, report, series, style  # noqa: E402
from analysis.synthetic import write_synthetic_study  # noqa: E402
from study import results  # noqa: E402
from study.results import trial_id  # noqa: E402

LR = 0.01  # not the study's smallest, so that drawing at the wrong lr shows
LEVEL = 0.9  # not the default 0.95, so that an ignored --level shows
SMOOTH = 25  # not the default 100
STEPS_PER_EPOCH = 200  # 600 steps > MAX_POINTS: some step bins hold two steps
OK = ("done", "running")
#: Unequal seeds per point: a running trial stops after 2 of 3 epochs, a diverged one is left out.
OUTCOME = {
    trial_id("batch", 0.0, LR, 2): ("running", 2),
    trial_id("none", 0.0, LR, 1): ("diverged", 2),
}
RTOL = 1e-9


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """The loaded synthetic study and the four figures drawn from it, by name."""
    folder = tmp_path_factory.mktemp("drawn") / "study"
    write_synthetic_study(
        folder, seeds=(0, 1, 2), epochs=3, steps_per_epoch=STEPS_PER_EPOCH, hist_bins=24,
        per_epoch=False, outcome=OUTCOME,
    )
    study = load.load_study(folder)
    opts = report.Options(
        results=folder, out=folder, lr=LR, lr_is_default=False, level=LEVEL, smooth=SMOOTH
    )
    styles = style.variant_styles(study.trials)
    figs: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layout.Sheet, "save", lambda sheet, name, *a, **k: figs.setdefault(name, sheet.fig))
        for draw in (plots_activations.fig_activations, plots_activations.fig_noisy_bn,
                     plots_training.fig_gradients, plots_activations.fig_histograms):
            draw(study, opts, styles, report.Report())
    yield study, figs
    for fig in figs.values():
        plt.close(fig)


# --------------------------------------------------------------------------- references


def at_lr_ok(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of trials at ``LR`` whose curves are drawn (done or still running)."""
    return frame[np.isclose(frame["lr"], LR) & frame["status"].isin(OK)]


def t_bands(frame: pd.DataFrame, x: str, value: str) -> pd.DataFrame:
    """Per (variant, x): mean over the rows (seeds), ``stats.t.interval`` at LEVEL, n."""
    rows = []
    for (variant, pos), v in frame.groupby(["variant", x], observed=True)[value]:
        v = v.to_numpy(dtype=float)
        v = v[np.isfinite(v)]
        mean = v.mean()
        if len(v) > 1:
            lo, hi = stats.t.interval(LEVEL, len(v) - 1, loc=mean, scale=stats.sem(v))
        else:
            lo = hi = mean
        rows.append((str(variant), float(pos), mean, lo, hi, len(v)))
    return pd.DataFrame(rows, columns=["variant", "x", "mean", "lo", "hi", "n"])


def log_floor(ref: pd.DataFrame) -> pd.DataFrame:
    """On a log axis, band edges below half the panel's smallest mean are drawn there (caption)."""
    floor = 0.5 * ref.loc[ref["mean"] > 0, "mean"].min()
    return ref.assign(lo=ref["lo"].where(ref["lo"] > floor, floor))


def grid(fig) -> dict[tuple[int, int], object]:
    """The figure's visible axes by (row, column) of its subplot grid."""
    return {
        (ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start): ax
        for ax in fig.axes
        if ax.get_visible()
    }


def band_edges(ax, color) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, lower edge, upper edge) of the one filled band drawn in ``color``, sorted by x."""
    rgb = mcolors.to_rgb(color)
    polys = [c for c in ax.collections if np.allclose(c.get_facecolor()[0][:3], rgb)]
    assert len(polys) == 1, f"{len(polys)} bands in {rgb} on {ax.get_title()!r}"
    xy = np.concatenate([p.vertices for p in polys[0].get_paths()])
    xs = np.unique(xy[:, 0])
    lo = np.array([xy[xy[:, 0] == v, 1].min() for v in xs])
    hi = np.array([xy[xy[:, 0] == v, 1].max() for v in xs])
    return xs, lo, hi


def assert_panel(ax, ref: pd.DataFrame) -> None:
    """One labelled line per reference variant at its (x, mean), and a band from lo to hi at
    every x where n > 1 (none where n = 1)."""
    lines = {ln.get_label(): ln for ln in ax.lines if not ln.get_label().startswith("_")}
    assert sorted(lines) == sorted(ref["variant"].unique()), ax.get_title()
    for variant, want in ref.groupby("variant"):
        want = want.sort_values("x")
        line = lines[variant]
        np.testing.assert_allclose(line.get_xdata(), want["x"], rtol=1e-12)
        np.testing.assert_allclose(line.get_ydata(), want["mean"], rtol=RTOL,
                                   err_msg=f"{ax.get_title()}: {variant} mean")
        banded = want[want["n"] > 1]
        xs, lo, hi = band_edges(ax, line.get_color())
        np.testing.assert_allclose(xs, banded["x"], rtol=1e-12)
        np.testing.assert_allclose(lo, banded["lo"], rtol=RTOL,
                                   err_msg=f"{ax.get_title()}: {variant} band low edge")
        np.testing.assert_allclose(hi, banded["hi"], rtol=RTOL,
                                   err_msg=f"{ax.get_title()}: {variant} band high edge")


def test_fixture_has_unequal_seed_counts(drawn):
    """The study the checks run on has points with 2 and with 3 seeds, and an excluded run."""
    study, _ = drawn
    n = at_lr_ok(study.epochs).groupby(["variant", "epoch"], observed=True).size()
    assert set(n) == {2, 3}
    assert (study.trials["status"] == "diverged").sum() == 1


# --------------------------------------------------------------------------- figure 1


def test_fig1_panels_are_layer_site_stat_mean_and_t_band_over_seeds(drawn):
    """Rows: ReLU input mean, variance, then conv output mean, variance (as the caption says);
    columns: conv layers. Each panel: no BN and BN, mean over seeds per epoch and its t band
    (variance: log axis, low edges floored at half the smallest mean). Reference: the layers
    table at the lr, done/running trials, grouped in pandas."""
    study, figs = drawn
    layers = at_lr_ok(study.layers)
    layers = layers[layers["norm"].isin(["none", "batch"])]
    axes = grid(figs["fig1_activations"])
    rows = [("preact", "mean"), ("preact", "var"), ("conv", "mean"), ("conv", "var")]
    assert sorted(axes) == [(r, c) for r in range(4) for c in range(len(results.ACT_LAYERS))]
    site_words = {"preact": "ReLU input", "conv": "conv output"}
    for r, (site, stat) in enumerate(rows):
        for c, layer in enumerate(results.ACT_LAYERS):
            ax = axes[r, c]
            word = "mean" if stat == "mean" else "variance"
            title = ax.get_title()
            assert title.startswith(f"{layer}: {word}, {site_words[site]}"), title
            assert site_words[site] in ax.get_ylabel() and ax.get_ylabel().startswith(word)
            part = layers[(layers["site"] == site) & (layers["layer"] == layer)]
            ref = t_bands(part, "epoch", stat)
            if stat == "var":
                assert ax.get_yscale() == "log"
                ref = log_floor(ref)
            assert_panel(ax, ref)


# --------------------------------------------------------------------------- figure 2


def test_fig2_panels_are_relu_input_and_accuracy_mean_and_t_band_over_seeds(drawn):
    """Left columns: each conv layer's ReLU-input mean, variance (log), then the spread across
    the epoch's batches of the per-batch mean and variance (log) for no BN, BN and both noisy
    BNs; right column: training (top) and test (second row) accuracy in percent, bands
    clipped to [0, 100], nothing below. Reference: the layers and epochs tables at the lr,
    done/running trials, mean and t interval over seeds per epoch in pandas/scipy."""
    study, figs = drawn
    layers = at_lr_ok(study.layers)
    layers = layers[layers["site"] == "preact"]
    epochs = at_lr_ok(study.epochs)
    axes = grid(figs["fig2_noisy_bn"])
    ncols = len(results.ACT_LAYERS) + 1
    assert sorted(axes) == sorted([(r, c) for r in range(2) for c in range(ncols)]
                                  + [(r, c) for r in (2, 3) for c in range(ncols - 1)])
    words = {"mean": "mean", "var": "variance", "batch_mean_std": "spread of the per-batch mean",
             "batch_var_std": "spread of the per-batch variance"}
    for r, stat in enumerate(words):
        for c, layer in enumerate(results.ACT_LAYERS):
            ax = axes[r, c]
            assert ax.get_title().startswith(f"{layer}: {words[stat]}"), ax.get_title()
            assert "ReLU input" in ax.get_title()
            ref = t_bands(layers[layers["layer"] == layer], "epoch", stat)
            if stat != "mean":
                assert ax.get_yscale() == "log"
                ref = log_floor(ref)
            assert ref["variant"].nunique() == 4
            assert_panel(ax, ref)
    for r, (column, title) in enumerate(
        (("train_acc", "Training accuracy"), ("test_acc", "Test accuracy"))
    ):
        ax = axes[r, ncols - 1]
        assert ax.get_title().startswith(title) and ax.get_ylabel() == "accuracy (%)"
        ref = t_bands(epochs.assign(pct=100 * epochs[column]), "epoch", "pct")
        assert_panel(ax, ref.assign(lo=ref["lo"].clip(0, 100), hi=ref["hi"].clip(0, 100)))


# --------------------------------------------------------------------------- figure 3


def smoothed_bins(steps: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per trial: trailing rolling mean over SMOOTH steps (pandas), then the mean of each of
    min(MAX_POINTS, distinct steps) equal-width step bins; x is the bin's mean step."""
    steps = steps.sort_values(["trial_id", "step"])
    smooth = steps.groupby("trial_id", observed=True)[column].transform(
        lambda s: s.astype(float).rolling(SMOOTH, min_periods=1).mean()
    )
    step = steps["step"].to_numpy()
    lo, hi = step.min(), step.max()
    unique = np.unique(step)
    nbins = min(series.MAX_POINTS, len(unique))

    def bin_of(s: np.ndarray) -> np.ndarray:
        return np.minimum((s - lo) * nbins // (hi - lo + 1), nbins - 1)

    frame = pd.DataFrame({"trial_id": steps["trial_id"].astype(str).to_numpy(),
                          "variant": steps["variant"].astype(str).to_numpy(),
                          "bin": bin_of(step), "value": smooth.to_numpy()})
    per_trial = frame.groupby(["trial_id", "variant", "bin"])["value"].mean().reset_index()
    centres = pd.Series(unique.astype(float)).groupby(bin_of(unique)).mean()
    return per_trial.assign(x=centres.reindex(per_trial["bin"]).to_numpy())


def test_fig3_panels_are_smoothed_binned_gradient_norms_with_t_band_over_seeds(drawn):
    """One panel per gradient norm (global, then each layer), titled with it; each line the
    mean over seeds of the per-trial smoothed, step-binned norm, with its t band (log axis).
    Reference: the steps table at the lr, pandas rolling mean per trial, bins averaged per
    trial, then t interval across seeds per bin."""
    study, figs = drawn
    steps = at_lr_ok(study.steps.frame())
    axes = grid(figs["fig3_gradients"])
    panels = ["grad_norm", *(f"grad_norm_{name}" for name in results.GRAD_LAYERS)]
    names = ["all weights (global)", *results.GRAD_LAYERS]
    assert len(axes) == len(panels)
    for i, (column, name) in enumerate(zip(panels, names, strict=True)):
        ax = axes[divmod(i, 3)]
        assert ax.get_title() == f"Gradient ℓ2 norm: {name}"
        assert ax.get_yscale() == "log"
        binned = smoothed_bins(steps, column)
        assert binned["bin"].nunique() == series.MAX_POINTS < steps["step"].nunique()
        assert_panel(ax, log_floor(t_bands(binned, "x", "value")))


# --------------------------------------------------------------------------- histograms


def test_histogram_panels_are_density_per_seed_averaged_over_seeds(drawn):
    """Rows: conv layers; columns: variants; panel titled ``variant — layer``. One curve per
    shown epoch (all three here), early to late from light to dark, at the bin centres: each
    seed's histogram as a density (counts ÷ total ÷ bin width), averaged over seeds, the two
    outer bins (which hold the tails) not drawn. Reference: the layers table's ``hist`` lists."""
    study, figs = drawn
    layers = at_lr_ok(study.layers)
    layers = layers[layers["site"] == "preact"]
    variants = [v for v in study.variants if v in set(layers["variant"].astype(str))]
    axes = grid(figs["fig_histograms"])
    assert sorted(axes) == [
        (r, c) for r in range(len(results.ACT_LAYERS)) for c in range(len(variants))
    ]
    for c, variant in enumerate(variants):
        for r, layer in enumerate(results.ACT_LAYERS):
            ax = axes[r, c]
            assert ax.get_title() == f"{variant} — {layer}"
            part = layers[(layers["variant"] == variant) & (layers["layer"] == layer)]
            epochs = sorted(part["epoch"].unique())
            assert len(ax.lines) == len(epochs) == 3
            darkness = []
            for line, epoch in zip(ax.lines, epochs, strict=True):
                rows = part[part["epoch"] == epoch]
                counts = np.stack(rows["hist"].to_numpy()).astype(float)
                lo, hi = rows["hist_lo"].iloc[0], rows["hist_hi"].iloc[0]
                width = (hi - lo) / counts.shape[1]
                want = (counts / counts.sum(axis=1, keepdims=True) / width).mean(axis=0)
                want[[0, -1]] = np.nan
                centres = lo + width * (np.arange(counts.shape[1]) + 0.5)
                np.testing.assert_allclose(line.get_xdata(), centres, rtol=1e-12)
                np.testing.assert_allclose(line.get_ydata(), want, rtol=RTOL,
                                           err_msg=f"{variant} — {layer}, epoch {epoch}")
                darkness.append(-sum(mcolors.to_rgb(line.get_color())))
            assert darkness == sorted(darkness) and len(set(darkness)) == 3
