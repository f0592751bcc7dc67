"""``python -m analysis.figures RESULTS``: the study's figures, tables and index page.

Reads a results folder (DESIGN §5), or several that hold parts of one study
(``analysis.load.load_studies``), and writes into ``RESULTS/figures`` (or ``--out``) the
figures of DESIGN §6 with confidence bands across seeds (drawn here), the accuracy and
gradient-stability tables (``analysis.tables``), and ``index.md`` / ``index.html`` showing
them all with the study's settings (``analysis.report``).
A figure whose data the study lacks is skipped with a notice; bad input exits with status 2
and one line on stderr, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.cli import Parser, python_interrupts, quiet_until_main

if __name__ == "__main__":  # Ctrl-C while matplotlib and pandas load: one line, not a traceback
    quiet_until_main("python -m analysis.figures")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from analysis import bands  # noqa: E402
from analysis.load import (  # noqa: E402
    OK_STATUSES,
    ResultsError,
    Study,
    format_number,
    load_studies,
    percent_scale,
)
from analysis.report import FORMATS, Options, Report, Skip, write_index  # noqa: E402
from analysis.tables import (  # noqa: E402
    accuracy_table,
    final_accuracies,
    stability_table,
    write_accuracy_table,
    write_stability_table,
)
from study import results  # noqa: E402

PROG = "python -m analysis.figures"
#: Most x positions a curve is drawn at; longer series are averaged into this many bins first.
MAX_POINTS = 500
DPI = 150

#: Okabe–Ito colours (colour-blind safe), one per norm, the same in every figure.
NORM_COLORS = {"none": "#D55E00", "batch": "#0072B2", "noisy_batch": "#009E73"}
EXTRA_COLORS = ("#E69F00", "#56B4E9", "#CC79A7", "#F0E442", "#000000")
NORM_MARKERS = {"none": "o", "batch": "s", "noisy_batch": "^"}
#: Line styles per noise magnitude among the noisy variants (smallest noise first).
NOISE_LINESTYLES = ("--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (8, 2)), "-")
SITE_WORDS = {
    "preact": "ReLU input (after norm)",
    "conv": "conv output (before norm)",
}
STEP_PANELS = ("grad_norm", *(f"grad_norm_{name}" for name in results.GRAD_LAYERS))


@dataclass(frozen=True)
class VariantStyle:
    """How one variant is drawn, identical in every figure."""

    color: str | tuple[float, float, float]
    linestyle: str | tuple
    marker: str
    label: str


# --------------------------------------------------------------------------- styles


def shade(color: str, t: float) -> tuple[float, float, float]:
    """``color`` lightened towards white (t < 0) or darkened towards black (t > 0) by |t|."""
    rgb = np.array(mcolors.to_rgb(color))
    target = np.ones(3) if t < 0 else np.zeros(3)
    return tuple(float(c) for c in rgb + abs(t) * (target - rgb))


def variant_styles(trials: pd.DataFrame) -> dict[str, VariantStyle]:
    """One colour per norm and one line style per noise magnitude, fixed for the whole study;
    a norm with several noise magnitudes also goes from light to dark as the noise grows, so
    that a dose-response reads at a glance."""
    pairs = trials[["variant", "norm", "noise"]].drop_duplicates("variant")
    other_norms = sorted(set(pairs["norm"]) - set(NORM_COLORS))
    styles = {}
    for variant, norm, noise in pairs.itertuples(index=False):
        if norm in NORM_COLORS:
            color = NORM_COLORS[norm]
        else:
            color = EXTRA_COLORS[other_norms.index(norm) % len(EXTRA_COLORS)]
        noises = sorted(pairs.loc[pairs["norm"] == norm, "noise"].unique())
        if len(noises) > 1:
            color = shade(color, -0.45 + 0.9 * noises.index(noise) / (len(noises) - 1))
        # Noisy BN: dashed family by noise; other norms: solid, then dashed for more noises.
        rank = noises.index(noise) + (0 if norm == "noisy_batch" else -1)
        linestyle = "-" if rank < 0 else NOISE_LINESTYLES[min(rank, len(NOISE_LINESTYLES) - 1)]
        styles[str(variant)] = VariantStyle(
            color, linestyle, NORM_MARKERS.get(norm, "D"), str(variant)
        )
    return styles


def _legend_handles(styles: dict[str, VariantStyle], variants: Sequence[str], markers: bool):
    return [
        Line2D(
            [],
            [],
            color=styles[v].color,
            ls=styles[v].linestyle,
            lw=1.8,
            marker=styles[v].marker if markers else None,
            ms=5,
            label=styles[v].label,
        )
        for v in variants
    ]


def _draw(
    ax,
    est: pd.DataFrame,
    styles: dict[str, VariantStyle],
    x: str,
    markers: bool,
    log: bool = False,
    clip: tuple[float, float] | None = None,
) -> None:
    """Mean lines with their bands, one per variant (no band where n = 1).

    With ``log``, the axis is logarithmic and band edges below half the smallest mean (those at
    or below zero of a wide t-interval of a positive quantity, and any lower) are drawn there,
    so that one wide band does not squeeze the others' decades. ``clip`` limits the bands
    to the range the quantity can take (e.g. a cosine's [-1, 1]).
    """
    if clip is not None:
        est = est.assign(lo=est["lo"].clip(*clip), hi=est["hi"].clip(*clip))
    means = est["mean"].to_numpy(dtype=float)
    if log and (means > 0).any():
        floor = 0.5 * means[means > 0].min()
        est = est.assign(lo=est["lo"].where(est["lo"] > floor, floor))
        _plain_log(ax, floor, float(est["hi"].max()))
    positions = np.unique(est[x].to_numpy(dtype=float))
    if len(positions) == 1:  # one tick at it, not a tiny range of fractional ones
        ax.set_xlim(positions[0] - 1, positions[0] + 1)
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(positions))
    groups = list(est.groupby("variant", observed=True, sort=True))
    for i, (variant, g) in enumerate(groups):
        st = styles[str(variant)]
        g = g.sort_values(x)
        xs = g[x].to_numpy(dtype=float)
        if len(positions) == 1:  # side by side, so that the error bars do not hide each other
            xs = xs + 0.12 * (i - (len(groups) - 1) / 2)
        ax.plot(
            xs,
            g["mean"],
            color=st.color,
            ls=st.linestyle,
            lw=1.6,
            marker=st.marker if markers else None,
            ms=4,
            label=st.label,
        )
        has_band = g["n"].to_numpy() > 1
        if len(xs) == 1 and has_band[0]:  # one position (a one-epoch study): no area to fill
            m, lo, hi = (float(g[c].iloc[0]) for c in ("mean", "lo", "hi"))
            ax.errorbar(xs, [m], yerr=[[m - lo], [hi - m]], color=st.color, capsize=4, lw=1.2)
        elif has_band.any():
            ax.fill_between(
                xs,
                g["lo"],
                g["hi"],
                where=has_band,
                color=st.color,
                alpha=0.18,
                lw=0,
                interpolate=False,
            )


# --------------------------------------------------------------------------- layout


def _new_figure(nrows: int, ncols: int, width: float, height: float, **kw):
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width, height), layout="constrained", squeeze=False, **kw
    )
    return fig, axes


def _finish(
    fig,
    name: str,
    title: str,
    caption: str,
    opts: Options,
    report: Report,
    legend: list | None = None,
) -> None:
    """Title, legend and caption outside the axes grid, then save in each format."""
    width, height = fig.get_size_inches()
    fig.text(0.5, 1 - 0.08 / height, title, ha="center", va="top", fontsize=12, weight="bold")
    top = 0.45
    if legend:
        ncols = min(len(legend), max(1, int(width // 2.2)))
        rows = math.ceil(len(legend) / ncols)
        fig.legend(
            handles=legend,
            loc="upper center",
            bbox_to_anchor=(0.5, 1 - 0.36 / height),
            ncols=ncols,
            frameon=False,
            fontsize=9,
        )
        top += 0.26 * rows + 0.05
    lines = []
    for para in caption.split("\n"):
        lines += textwrap.wrap(para, int(width * 72 / (8 * 0.58)))
    bottom = (len(lines) * 8 * 1.3 / 72 + 0.2) / height
    fig.get_layout_engine().set(rect=(0, bottom, 1, 1 - bottom - top / height))
    fig.text(0.01, bottom / 2, "\n".join(lines), fontsize=8, va="center", ha="left")
    paths = []
    for fmt in opts.formats:
        path = opts.out / f"{name}.{fmt}"
        fig.savefig(path, dpi=DPI)
        paths.append(path.name)
        fig.set_layout_engine("none")  # positions are final; don't lay out again per format
    plt.close(fig)
    report.figures.append((name, title, caption))
    print(f"wrote {', '.join(str(opts.out / p) for p in paths)}")


def _caption(study: Study, opts: Options, est: pd.DataFrame | None, *extra: str) -> str:
    parts = []
    if est is not None:
        label = bands.method_label(opts.method, opts.level, opts.reps)
        parts.append(f"Lines: mean over seeds; bands: {label} ({bands.describe_n(est)}).")
    parts += [e for e in extra if e]
    parts.append(f"Dataset: {', '.join(study.datasets)}.")
    return " ".join(parts)


def _lr_words(opts: Options) -> str:
    text = f"Learning rate {format_number(opts.lr)}"
    if opts.lr_is_default:
        text += " (the smallest in the study; another with --lr)"
    return text + "."


_STATUS_WORDS = {"error": "failed"}


def _excluded_words(study: Study, opts: Options, norms: Sequence[str] | None = None) -> str:
    """Say how many trials at the figure's lr (and norms) were left out or are unfinished."""
    trials = _at_lr(study.trials, opts.lr)
    if norms is not None:
        trials = trials[trials["norm"].isin(norms)]
    counts = trials["status"].astype(str).value_counts()
    left = {s: int(counts[s]) for s in counts.index if s not in OK_STATUSES and counts[s]}
    running = int(counts.get("running", 0))
    words = []
    if left:
        words.append(
            "Left out: "
            + ", ".join(
                f"{k} {_STATUS_WORDS.get(s, s)} run{'s' if k > 1 else ''}" for s, k in left.items()
            )
            + "."
        )
    if running:
        words.append(f"{running} run{'s' if running > 1 else ''} still running (curves end early).")
    ok = trials["status"].isin(OK_STATUSES)
    gone = sorted(str(v) for v, g in ok.groupby(trials["variant"].astype(str)) if not g.any())
    if gone:
        words.append(f"Not drawn, as none of its runs finished: {', '.join(gone)}.")
    return " ".join(words)


def _at_lr(frame: pd.DataFrame, lr: float) -> pd.DataFrame:
    return frame[np.isclose(frame["lr"].to_numpy(dtype=float), lr, rtol=1e-9, atol=0)]


def _ok(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"].isin(OK_STATUSES)]


def _variants_in(frame: pd.DataFrame) -> list[str]:
    present = set(frame["variant"].astype(str).unique())
    return [v for v in frame["variant"].cat.categories if v in present]


# --------------------------------------------------------------------------- figures 1 and 2


def fig_activations(study: Study, opts: Options, styles, report: Report) -> None:
    """Figure 1: activation mean and variance per layer over epochs, BN vs no BN."""
    sel = _at_lr(study.layers, opts.lr)
    if sel.empty:
        raise Skip(f"no activation statistics at lr {format_number(opts.lr)} yet")
    sel = sel[sel["norm"].isin(["none", "batch"])]
    found = set(sel["norm"].astype(str))
    if not {"none", "batch"} <= found:
        missing = sorted({"none", "batch"} - found)
        raise Skip(
            f"needs runs with BN (batch) and without (none) at lr {format_number(opts.lr)}; "
            f"missing: {', '.join(missing)}"
        )
    drawn = _ok(sel)
    if drawn.empty:
        raise Skip("no finished or running BN / no-BN runs to draw (all diverged or failed)")
    layers = [name for name in results.ACT_LAYERS if name in set(drawn["layer"])]
    rows = [("preact", "mean"), ("preact", "var"), ("conv", "mean"), ("conv", "var")]
    fig, axes = _new_figure(len(rows), len(layers), 3.6 * len(layers), 10.5, sharex=True)
    all_est = []
    for r, (site, stat) in enumerate(rows):
        est = opts.estimate(drawn[drawn["site"] == site], ["variant", "layer"], "epoch", stat)
        all_est.append(est)
        for c, layer in enumerate(layers):
            ax = axes[r, c]
            part = est[est["layer"] == layer]
            _draw(ax, part, styles, "epoch", markers=True, log=stat == "var")
            _activation_axes(ax, stat, site, layer)
            if r == len(rows) - 1:
                ax.set_xlabel("epoch")
    est = pd.concat(all_est)
    title = "Figure 1 — Activation mean and variance per conv layer over training: BN vs no BN"
    caption = _caption(
        study,
        opts,
        est,
        "Mean and variance over all activations of each epoch's training batches; top two rows: "
        "the ReLU input (after the norm), bottom two: the conv output (before the norm); "
        "without BN both are the same. Variance on a log scale (band edges below half the "
        "smallest mean, those at or below zero included, drawn there).",
        _lr_words(opts),
        _excluded_words(study, opts, ["none", "batch"]),
    )
    _finish(
        fig,
        "fig1_activations",
        title,
        caption,
        opts,
        report,
        _legend_handles(styles, _variants_in(drawn), markers=True),
    )


def _plain_log(ax, lo: float, hi: float) -> None:
    """Log y axis labelled with plain numbers, more of them per decade when the range is narrow."""
    ax.set_yscale("log")
    ticker = matplotlib.ticker
    ratio = hi / lo if np.isfinite(hi) else np.inf
    if ratio < 10:  # less than a decade: evenly spaced values read better than 1, 2, 5
        ax.yaxis.set_major_locator(ticker.MaxNLocator(nbins=5))
    else:
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0) if ratio < 1e3 else (1.0,)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _integer_ticks(ax) -> None:
    """Epochs are whole numbers; a single one keeps the tick ``_draw`` gave it."""
    if not isinstance(ax.xaxis.get_major_locator(), matplotlib.ticker.FixedLocator):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))


def _activation_axes(ax, stat: str, site: str, layer: str) -> None:
    word = "mean" if stat == "mean" else "variance"
    ax.set_ylabel(f"{word} of {SITE_WORDS[site].split(' (')[0]}")
    ax.set_title(f"{layer}: {word}, {SITE_WORDS[site]}", fontsize=9)
    ax.grid(alpha=0.3)
    if stat == "mean":
        ax.axhline(0, color="0.6", lw=0.8, zorder=0)
    _integer_ticks(ax)


def fig_noisy_bn(study: Study, opts: Options, styles, report: Report) -> None:
    """Figure 2: no BN, BN and noisy BN activations beside their accuracy curves."""
    norms = ["none", "batch", "noisy_batch"]
    sel = _at_lr(study.layers, opts.lr)
    if sel.empty:
        raise Skip(f"no activation statistics at lr {format_number(opts.lr)} yet")
    sel = sel[sel["norm"].isin(norms) & (sel["site"] == "preact")]
    if "noisy_batch" not in set(sel["norm"].astype(str)):
        raise Skip(f"needs noisy BN (noisy_batch) runs at lr {format_number(opts.lr)}")
    drawn = _ok(sel)
    all_epochs = _at_lr(study.epochs, opts.lr)
    epochs = _ok(all_epochs)
    epochs = epochs[epochs["norm"].isin(norms)]
    if all_epochs.empty:
        raise Skip(f"no accuracy per epoch (epochs table) at lr {format_number(opts.lr)}")
    if drawn.empty or epochs.empty:
        raise Skip("no finished or running runs to draw (all diverged or failed)")
    layers = [name for name in results.ACT_LAYERS if name in set(drawn["layer"])]
    ncols = len(layers) + 1
    fig, axes = _new_figure(2, ncols, 3.4 * ncols, 6.6, sharex=True)
    all_est = []
    for r, stat in enumerate(("mean", "var")):
        est = opts.estimate(drawn, ["variant", "layer"], "epoch", stat)
        all_est.append(est)
        for c, layer in enumerate(layers):
            part = est[est["layer"] == layer]
            _draw(axes[r, c], part, styles, "epoch", markers=True, log=stat == "var")
            _activation_axes(axes[r, c], stat, "preact", layer)
    scale = percent_scale(epochs[["train_acc", "test_acc"]].to_numpy())
    acc = epochs.assign(train=epochs["train_acc"] * scale, test=epochs["test_acc"] * scale)
    for r, (col, words) in enumerate(
        (("train", "training accuracy (running over the epoch)"), ("test", "test accuracy"))
    ):
        est = opts.estimate(acc, ["variant"], "epoch", col)
        all_est.append(est)
        ax = axes[r, ncols - 1]
        _draw(ax, est, styles, "epoch", markers=True, clip=(0.0, 100.0))
        ax.set_title(words[0].upper() + words[1:], fontsize=9)
        ax.set_ylabel("accuracy (%)" if scale == 100 else "accuracy")
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
        _integer_ticks(ax)
    title = "Figure 2 — Noisy BatchNorm: activation distribution vs accuracy"
    caption = _caption(
        study,
        opts,
        pd.concat(all_est),
        "Left: mean (top) and variance (bottom, log scale) of each conv layer's ReLU input "
        "(after the norm and, for noisy BN, after the injected noise) per epoch. Right: "
        "training accuracy (running average over the epoch, as the seed reports it) and test "
        "accuracy. Bands are clipped to what the quantity can take (variance > 0, accuracy in "
        "[0, 100]\u00a0%).",
        _lr_words(opts),
        _excluded_words(study, opts, norms),
    )
    variants = [v for v in study.variants if v in set(drawn["variant"].astype(str))]
    _finish(
        fig,
        "fig2_noisy_bn",
        title,
        caption,
        opts,
        report,
        _legend_handles(styles, variants, markers=True),
    )


# --------------------------------------------------------------------------- figure 3


def moving_average(values: np.ndarray, group_start: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Trailing mean over the last ``window`` rows of each row's group, skipping non-finite values.

    Rows are sorted by group; ``group_start[i]`` is the first row of row i's group. Cumulative
    sums make it one pass over millions of rows.
    """
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    csum = np.concatenate([[0.0], np.cumsum(np.where(finite, v, 0.0))])
    ccount = np.concatenate([[0], np.cumsum(finite)])
    i = np.arange(len(v))
    start = np.maximum(group_start, i - window + 1)
    total, count = csum[i + 1] - csum[start], ccount[i + 1] - ccount[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def smoothed_step_curves(
    steps: pd.DataFrame,
    columns: Sequence[str],
    smooth: int,
    grad_every: pd.Series | None = None,
    max_points: int = MAX_POINTS,
) -> pd.DataFrame:
    """Per trial: moving average over ``smooth`` training steps, then averaged into ≤ max_points
    step bins, so that bands across seeds are computed at few positions. One row per (trial, bin)
    with ``step`` (mean step of the bin), the trial columns and the smoothed ``columns``.
    """
    codes = steps["trial_id"].cat.codes.to_numpy()
    step = steps["step"].to_numpy()
    order = np.lexsort((step, codes))
    codes, step = codes[order], step[order]
    n = len(codes)
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = codes[1:] != codes[:-1]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    every = np.ones(len(steps["trial_id"].cat.categories))
    if grad_every is not None:
        every = (
            grad_every.reindex(steps["trial_id"].cat.categories).fillna(1).clip(lower=1).to_numpy()
        )
    window = np.maximum(1, np.round(smooth / every[codes])).astype(np.int64)
    lo, hi = int(step.min()), int(step.max())
    nbins = int(min(max_points, len(np.unique(step))))
    bins = np.minimum((step - lo) * nbins // max(hi - lo + 1, 1), nbins - 1)
    data = {"code": codes, "bin": bins, "step": step.astype(np.float64)}
    for col in columns:
        data[col] = moving_average(steps[col].to_numpy()[order], group_start, window)
    binned = pd.DataFrame(data).groupby(["code", "bin"], sort=False).mean().reset_index()
    bin_step = pd.Series(step.astype(np.float64)).groupby(bins).mean()
    binned["step"] = bin_step.reindex(binned["bin"]).to_numpy()
    first = np.flatnonzero(new_group)
    lookup = steps.iloc[order[first]].set_index(pd.Index(codes[first]))
    for col in ("trial_id", "variant", "seed", "lr", "status"):
        values = lookup[col].reindex(binned["code"])
        binned[col] = (
            values.to_numpy()
            if col != "variant"
            else pd.Categorical(values.astype(str), dtype=steps["variant"].dtype)
        )
    return binned.drop(columns="code")


def fig_gradients(study: Study, opts: Options, styles, report: Report) -> None:
    """Figure 3: global and per-layer gradient norm over iterations, smoothed, with bands."""
    if study.steps.empty:
        raise Skip("the steps table is empty (no per-step gradient norms recorded)")
    sel = _at_lr(study.steps, opts.lr)
    if sel.empty:
        raise Skip(f"no per-step gradient norms at lr {format_number(opts.lr)}")
    drawn = _ok(sel)
    if drawn.empty:
        raise Skip("no finished or running runs to draw (all diverged or failed)")
    drawn = drawn.assign(trial_id=drawn["trial_id"].cat.remove_unused_categories())
    panels = [c for c in STEP_PANELS if drawn[c].notna().any()]
    grad_every = study.trials.set_index("trial_id")["grad_every"]
    curves = smoothed_step_curves(drawn, panels, opts.smooth, grad_every)
    ncols = 3
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _new_figure(nrows, ncols, 13, 3.3 * nrows + 0.4, sharex=True)
    all_est = []
    for ax, col in zip(axes.flat, panels, strict=False):
        est = opts.estimate(curves, ["variant"], "step", col)
        all_est.append(est)
        _draw(ax, est, styles, "step", markers=False, log=True)
        name = "all weights (global)" if col == "grad_norm" else col.removeprefix("grad_norm_")
        ax.set_title(f"Gradient ℓ2 norm: {name}", fontsize=10)
        ax.set_ylabel("gradient norm")
        ax.grid(alpha=0.3, which="both")
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("training iteration (step)")
    title = "Figure 3 — Gradient norm over training iterations"
    caption = _caption(
        study,
        opts,
        pd.concat(all_est),
        f"Gradient ℓ2 norm after backward(), before the optimiser step; per run a trailing "
        f"moving average over {opts.smooth} steps (--smooth), then averaged into at most "
        f"{MAX_POINTS} step bins before the bands across seeds. Log scale (band edges below "
        "half the smallest mean, those at or below zero included, drawn there).",
        _lr_words(opts),
        _excluded_words(study, opts),
    )
    _finish(
        fig,
        "fig3_gradients",
        title,
        caption,
        opts,
        report,
        _legend_handles(styles, _variants_in(drawn), markers=False),
    )


def fig_lr_sensitivity(study: Study, opts: Options, styles, report: Report) -> None:
    """Final train and test accuracy against learning rate per variant; diverged runs marked."""
    if len(study.lrs) < 2:
        raise Skip(f"needs at least two learning rates (the study has {len(study.lrs)})")
    final = final_accuracies(study)
    done = final[final["status"] == "done"]
    if done.empty:
        raise Skip("no finished runs yet")
    scale = percent_scale(done[["train_acc", "test_acc"]].to_numpy())
    done = done.assign(train=done["train_acc"] * scale, test=done["test_acc"] * scale)
    diverged = final[final["status"] == "diverged"].groupby(["variant", "lr"], observed=True).size()
    fig, axes = _new_figure(1, 2, 12, 4.8)
    all_est = []
    for ax, (col, words) in zip(
        axes[0],
        (
            ("train", "Final training accuracy (running over the last epoch)"),
            ("test", "Final test accuracy"),
        ),
        strict=True,
    ):
        est = opts.estimate(done, ["variant"], "lr", col)
        all_est.append(est)
        _draw(ax, est, styles, "lr", markers=True, clip=(0.0, 100.0))
        ax.set_xscale("log")
        ax.set_xticks(study.lrs, [format_number(x) for x in study.lrs])
        ax.minorticks_off()
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel("accuracy (%)" if scale == 100 else "accuracy")
        ax.set_title(words, fontsize=10)
        ax.grid(alpha=0.3)
        if len(diverged):  # a shaded strip below the data, so that a cross is never read as one
            bottom, top = ax.get_ylim()
            strip = 0.045 * (1 + len(study.variants)) * (top - bottom)
            ticks = [t for t in ax.get_yticks() if bottom <= t <= top]  # no accuracy ticks in it
            ax.set_ylim(bottom - strip, top)
            ax.set_yticks(ticks)
            ax.axhspan(bottom - strip, bottom, color="0.92", lw=0, zorder=0)
            ax.text(0.005, bottom - strip / 2, "diverged", transform=ax.get_yaxis_transform(),
                    rotation=90, va="center", ha="left", fontsize=7, color="0.4")
        for (variant, lr), k in diverged.items():
            st = styles[str(variant)]
            y = bottom - strip * (1 + study.variants.index(str(variant))) / (1 + len(study.variants))
            ax.plot([lr], [y], marker="x", color=st.color, ms=7, mew=2, ls="none")
            ax.text(lr, y, f"  {k}", color=st.color, va="center", fontsize=8)
    legend = _legend_handles(styles, _variants_in(final), markers=True)
    if len(diverged):
        legend.append(
            Line2D(
                [],
                [],
                color="0.3",
                marker="x",
                ls="none",
                ms=8,
                mew=2,
                label="diverged runs (count), in the shaded strip",
            )
        )
    title = "Final accuracy against learning rate"
    caption = _caption(
        study,
        opts,
        pd.concat(all_est),
        "Points: mean over the runs that finished at each learning rate; bands clipped to "
        "[0, 100]\u00a0%.",
        "A cross in the shaded strip at the bottom marks diverged runs (non-finite loss) with "
        "their count; they are not in the means."
        if len(diverged)
        else "No run diverged.",
    )
    _finish(fig, "fig_lr_sensitivity", title, caption, opts, report, legend)


# --------------------------------------------------------------------------- histograms


def histogram_densities(layers: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Densities of every row's histogram on one common bin grid: (edges, densities[row, bin]).

    Rows whose bins differ are re-binned through their cumulative counts, so seeds can be
    averaged even if a run changed its histogram range. A row's outer bins also hold the values
    clamped into them (tails, not density): they go to the common grid's outer bins.
    """
    lo, hi = layers["hist_lo"].to_numpy(float), layers["hist_hi"].to_numpy(float)
    lengths = layers["hist"].map(len).to_numpy()
    nb = int(lengths.max())
    edges = np.linspace(lo.min(), hi.max(), nb + 1)
    width = np.diff(edges)
    if (lo == lo[0]).all() and (hi == hi[0]).all() and (lengths == nb).all():
        counts = np.stack(layers["hist"].to_numpy()).astype(float)
    else:
        counts = np.zeros((len(layers), nb))
        for i, (h, a, b) in enumerate(zip(layers["hist"], lo, hi, strict=True)):
            h = np.asarray(h, dtype=float)
            own = np.linspace(a, b, len(h) + 1)
            cdf = np.concatenate([[0.0], np.cumsum(h[1:-1])])
            counts[i] = np.diff(np.interp(edges, own[1:-1], cdf))
            counts[i, 0] += h[0]
            counts[i, -1] += h[-1] if len(h) > 1 else 0.0
    total = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return edges, np.where(total > 0, counts / total / width, np.nan)


def _histogram_batches(study: Study) -> str:
    """Which training batches the histograms count: every ``hist_every``-th (the trials' config)."""
    every = set()
    for text in study.trials.get("config_json", pd.Series(dtype=object)).dropna():
        try:
            every.add(int(json.loads(text)["hist_every"]))
        except (ValueError, KeyError, TypeError):
            every.add(None)
    if len(every) != 1 or None in every:
        return "a sample of the training batches (every hist_every-th; see the trials' config)"
    (k,) = every
    return "every training batch" if k == 1 else f"every {k}th training batch (hist_every)"


def fig_histograms(study: Study, opts: Options, styles, report: Report) -> None:
    """Activation distributions (ReLU input) over epochs: rows layers, columns variants."""
    sel = _at_lr(study.layers, opts.lr)
    sel = _ok(sel[(sel["site"] == "preact") & sel["hist"].notna()])
    sel = sel[sel["hist"].map(len) > 0]
    if sel.empty:
        raise Skip(f"no activation histograms at lr {format_number(opts.lr)}")
    edges, dens = histogram_densities(sel)
    centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    keys = sel[["variant", "layer", "epoch"]].astype({"variant": str}).reset_index(drop=True)
    keys["row"] = np.arange(len(keys))
    all_epochs = sorted(sel["epoch"].unique())
    shown = sorted(
        {
            all_epochs[int(round(i))]
            for i in np.linspace(0, len(all_epochs) - 1, min(5, len(all_epochs)))
        }
    )
    variants = _variants_in(sel)
    layers = [name for name in results.ACT_LAYERS if name in set(sel["layer"])]
    fig, axes = _new_figure(
        len(layers), len(variants), 2.9 * len(variants) + 0.6, 2.4 * len(layers) + 0.6
    )
    shades = np.linspace(0.4, 1.0, len(shown)) if len(shown) > 1 else np.ones(1)  # one epoch: full colour
    n_seeds = []
    visible_range: dict[int, list[float]] = {}
    for c, variant in enumerate(variants):
        base = np.array(mcolors.to_rgb(styles[variant].color))
        for r, layer in enumerate(layers):
            ax = axes[r, c]
            part = keys[(keys["variant"] == variant) & (keys["layer"] == layer)]
            peak_bins, outer = [], 0.0
            for epoch, shade in zip(shown, shades, strict=True):
                rows = part.loc[part["epoch"] == epoch, "row"].to_numpy()
                if not len(rows):
                    continue
                n_seeds.append(len(rows))
                d = np.nanmean(dens[rows], axis=0)
                # The outer bins also hold the clamped tails: their height is not a density.
                outer = max(outer, float((d[[0, -1]] * width[[0, -1]]).sum()))
                d = d.copy()
                d[[0, -1]] = np.nan
                color = 1 - shade * (1 - base)
                ax.plot(centers, d, color=color, lw=1.4)
                peak_bins.append(d)
            if outer >= 0.005:
                ax.text(
                    0.98,
                    0.95,
                    f"outer bins: up to {outer:.0%}",
                    transform=ax.transAxes,
                    ha="right",
                    va="top",
                    fontsize=7,
                    color="0.3",
                )
            if peak_bins:
                stack = np.nan_to_num(np.vstack(peak_bins)).max(axis=0)
                visible = np.flatnonzero(stack > 2e-3 * stack.max())
                if len(visible):
                    span = visible_range.setdefault(r, [np.inf, -np.inf])
                    span[0] = min(span[0], edges[visible[0]])
                    span[1] = max(span[1], edges[visible[-1] + 1])
            ax.set_title(f"{variant} — {layer}", fontsize=9)
            ax.grid(alpha=0.3)
            if c == 0:
                ax.set_ylabel("density")
            if r == len(layers) - 1:
                ax.set_xlabel("ReLU input value")
    for r, (a, b) in visible_range.items():
        pad = 0.05 * (b - a)
        for ax in axes[r]:
            ax.set_xlim(a - pad, b + pad)
    gray = [
        Line2D([], [], color=str(1 - 0.85 * s), lw=2, label=f"epoch {e}")
        for e, s in zip(shown, shades, strict=True)
    ]
    title = "Activation distributions over training (ReLU input, after the norm)"
    caption = _caption(
        study,
        opts,
        None,
        f"Each panel: the histogram of all ReLU inputs of a layer in {_histogram_batches(study)} "
        f"of an epoch, normalised to a density and averaged over seeds "
        f"({bands.describe_n(n_seeds, per='curve', band=False)}); light to dark = early to late "
        f"epochs. The two outermost bins of [{format_number(edges[0])}, "
        f"{format_number(edges[-1])}] also hold the values beyond that range, so they are not "
        "drawn; where they hold 0.5% or more, the panel says how much. The x range, shared "
        "along a row, is cut to where the density is visible.",
        _lr_words(opts),
        _excluded_words(study, opts),
    )
    _finish(fig, "fig_histograms", title, caption, opts, report, gray)


# --------------------------------------------------------------------------- probes


def _probe_frame(study: Study, opts: Options) -> pd.DataFrame:
    if study.probes is None or study.probes.empty:
        raise Skip("no probes recorded (probe_every = 0)")
    sel = _ok(_at_lr(study.probes, opts.lr))
    if sel.empty:
        raise Skip(f"no probe rows at lr {format_number(opts.lr)}")
    return sel


def _bin_steps(frame: pd.DataFrame, max_points: int = MAX_POINTS) -> pd.DataFrame:
    """Replace ``step`` by the mean step of ≤ max_points equal bins when there are more steps."""
    steps = frame["step"].to_numpy()
    unique = np.unique(steps)
    if len(unique) <= max_points:
        return frame
    lo, hi = int(unique[0]), int(unique[-1])
    bins = np.minimum((steps - lo) * max_points // (hi - lo + 1), max_points - 1)
    centers = pd.Series(steps.astype(float)).groupby(bins).mean()
    return frame.assign(step=centers.reindex(bins).to_numpy())


def fig_probes_ics(study: Study, opts: Options, styles, report: Report) -> None:
    """Gradient-based internal covariate shift per layer over training (Santurkar §2.2)."""
    sel = _probe_frame(study, opts)
    # the first layer has no layers before it: G' = G by definition, nothing to draw
    first = results.PROBE_LAYERS[0]
    layers = [name for name in results.PROBE_LAYERS[1:] if name in set(sel["layer"])]
    layers += sorted(set(sel["layer"].dropna()) - set(layers) - {first})
    if not layers or sel[["ics_l2", "ics_cos"]].isna().all().all():
        raise Skip("the probes hold no ICS values")
    sel = _bin_steps(sel)
    per_trial = (
        sel.groupby(["trial_id", "variant", "layer", "step"], observed=True)[["ics_l2", "ics_cos"]]
        .mean()
        .reset_index()
    )
    fig, axes = _new_figure(2, len(layers), 3.0 * len(layers) + 0.5, 6.4, sharex=True)
    all_est = []
    for r, (col, words) in enumerate((("ics_l2", "‖G − G′‖ (ℓ2)"), ("ics_cos", "cos(G, G′)"))):
        est = opts.estimate(per_trial, ["variant", "layer"], "step", col)
        all_est.append(est)
        clip = (0.0, np.inf) if col == "ics_l2" else (-1.0, 1.0)
        for c, layer in enumerate(layers):
            ax = axes[r, c]
            _draw(ax, est[est["layer"] == layer], styles, "step", markers=False, clip=clip)
            ax.set_title(f"{layer}: {words}", fontsize=9)
            ax.grid(alpha=0.3)
            if c == 0:
                ax.set_ylabel("ℓ2 difference" if col == "ics_l2" else "cosine similarity")
            if r == 1:
                ax.set_xlabel("training step")
    title = "Internal covariate shift (gradient-based) per layer"
    caption = _caption(
        study,
        opts,
        pd.concat(all_est),
        "G: a layer's gradient at the probed step; G′: the same gradient after the layers "
        "before it took their update (Santurkar et al. 2018, §2.2). Same batch, BN statistics, "
        "dropout masks and noise held fixed. Bands clipped to the possible range (ℓ2 ≥ 0, "
        "cosine in [-1, 1]). conv1 is not drawn: no layer precedes it, so G′ = G.",
        _lr_words(opts),
    )
    _finish(
        fig,
        "fig_probes_ics",
        title,
        caption,
        opts,
        report,
        _legend_handles(styles, _variants_in(sel), markers=False),
    )


def fig_probes_landscape(study: Study, opts: Options, styles, report: Report) -> None:
    """Loss landscape along the gradient: loss range, gradient predictiveness, β-smoothness."""
    sel = _probe_frame(study, opts)
    cols = ["loss_min", "loss_max", "grad_pred", "beta_smooth"]
    if sel[cols].isna().all().all():
        raise Skip("the probes hold no loss-landscape values")
    sel = _bin_steps(sel)
    # The landscape measures are per step (the whole model); average any per-layer rows.
    per_trial = sel.groupby(["trial_id", "variant", "step"], observed=True)[cols].mean()
    per_trial = per_trial.reset_index()
    fig, axes = _new_figure(1, 3, 14, 4.6)
    ax = axes[0, 0]
    for variant, g in per_trial.groupby("variant", observed=True, sort=True):
        st = styles[str(variant)]
        g = g.groupby("step")[["loss_min", "loss_max"]].mean().reset_index()
        ax.fill_between(g["step"], g["loss_min"], g["loss_max"], color=st.color, alpha=0.25, lw=0)
        for c in ("loss_min", "loss_max"):
            ax.plot(g["step"], g[c], color=st.color, ls=st.linestyle, lw=1.0)
    ax.set_title("Loss variation: min–max over step sizes η", fontsize=10)
    ax.set_ylabel("loss")
    all_est = []
    for ax, (col, words, label) in zip(
        axes[0, 1:],
        (
            ("grad_pred", "Gradient predictiveness: ℓ2 change of the gradient", "ℓ2 change"),
            ("beta_smooth", "Effective β-smoothness", "β"),
        ),
        strict=True,
    ):
        est = opts.estimate(per_trial, ["variant"], "step", col)
        all_est.append(est)
        _draw(ax, est, styles, "step", markers=False, log=True)
        ax.set_title(words, fontsize=10)
        ax.set_ylabel(label)
    for ax in axes[0]:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    title = "Loss landscape along the gradient (Santurkar et al. 2018, §3)"
    caption = _caption(
        study,
        opts,
        pd.concat(all_est),
        "Left: the range (min to max) of the loss when stepping along the gradient by each "
        "probed η, mean over seeds (the shaded area is that range, not an interval). Middle and "
        "right: gradient predictiveness and effective β-smoothness along the same steps, "
        "log scale.",
        _lr_words(opts),
    )
    _finish(
        fig,
        "fig_probes_landscape",
        title,
        caption,
        opts,
        report,
        _legend_handles(styles, _variants_in(sel), markers=False),
    )


# --------------------------------------------------------------------------- command line


def _number(kind: type, ok, must: str):
    """An argparse type: parse ``kind`` and check ``ok``, with one clear message either way."""
    noun = "a whole number" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} must be {must}")
        return value

    return parse


_level = _number(float, lambda v: 0 < v < 1, "between 0 and 1 (e.g. 0.95)")
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
_positive_int = _number(int, lambda v: v >= 1, "at least 1")


def _formats(text: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(x.strip().lower() for x in text.split(",") if x.strip()))
    bad = [x for x in items if x not in FORMATS]
    if not items or bad:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a comma-separated list of {', '.join(FORMATS)}"
        )
    return items


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m analysis.figures``."""
    p = Parser(
        prog=PROG,
        name=PROG,
        description="Draw the BatchNorm study's figures, accuracy and gradient-stability tables "
        "and index page from a "
        "results folder (RESULTS/<table>/<trial_id>.parquet).",
    )
    p.add_argument("results", metavar="RESULTS", nargs="+",
                   help="the results folder written by the sweep; several folders that hold parts "
                   "of one study (other seeds or learning rates, same settings) are drawn as one, "
                   "into --out")
    p.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        default=None,
        help="where to write the figures (default: RESULTS/figures; needed for several RESULTS)",
    )
    p.add_argument(
        "--ci",
        choices=bands.METHODS,
        default="t",
        help="interval across seeds: t = Student-t interval of the mean, bootstrap = "
        "percentile bootstrap of the mean, 2,000 seeded resamples (default: t)",
    )
    p.add_argument(
        "--level",
        type=_level,
        default=0.95,
        metavar="P",
        help="confidence level of the bands and table, in (0, 1) (default: 0.95)",
    )
    p.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        metavar="LR",
        help="learning rate shown in figures 1-3, the histograms and the probes; "
        "must be one in the study (default: the smallest in the study)",
    )
    p.add_argument(
        "--smooth",
        type=_positive_int,
        default=100,
        metavar="N",
        help="moving-average window of the gradient-norm curves, in training steps (default: 100)",
    )
    p.add_argument(
        "--format",
        type=_formats,
        default=FORMATS,
        metavar="LIST",
        dest="formats",
        help="comma-separated figure formats among png, pdf (default: png,pdf)",
    )
    return p


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad input, nothing written).

    Ctrl-C gives one line and status 130, not a traceback: it says whether anything was written.
    """
    python_interrupts()
    started: list[Path] = []  # the output folder, once writing into it has begun
    try:
        return _main(argv, started)
    except KeyboardInterrupt:
        plt.close("all")
        done = (
            f"the files written so far in {started[0]} are kept, but its index is not up to date"
            if started
            else "nothing was written"
        )
        sys.stderr.write(f"{PROG}: interrupted; {done}\n")
        return 130


def _main(argv: Sequence[str] | None, started: list[Path]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        if len(args.results) > 1 and args.out is None:
            raise ResultsError(f"{len(args.results)} results folders are drawn as one study into "
                               "--out DIR: give it")
        study = load_studies(args.results, step_columns=STEP_PANELS)
    except ResultsError as exc:
        sys.stderr.write(f"{PROG}: error: {_one_line(str(exc))}\n")
        return 2
    lrs = study.lrs
    if not lrs:
        sys.stderr.write(f"{PROG}: error: {study.name}: the trials table has no learning rate\n")
        return 2
    if args.lr is None:
        lr, lr_is_default = lrs[0], True
    else:
        match = [x for x in lrs if math.isclose(x, args.lr, rel_tol=1e-9)]
        if not match:
            sys.stderr.write(
                f"{PROG}: error: --lr {format_number(args.lr)} is not in the study (its learning "
                f"rates: {', '.join(format_number(x) for x in lrs)})\n"
            )
            return 2
        lr, lr_is_default = match[0], False
    out = Path(args.out) if args.out is not None else study.path / "figures"
    opts = Options(
        results=study.path,
        out=out,
        method=args.ci,
        level=args.level,
        lr=lr,
        lr_is_default=lr_is_default,
        smooth=args.smooth,
        formats=args.formats,
    )
    started.append(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        sys.stderr.write(f"{PROG}: error: cannot write to {out}: {_one_line(exc.strerror or exc)}\n")
        return 2
    try:
        run(study, opts)
    except OSError as exc:  # e.g. a folder where a figure's file should go, or a full disk
        where = f" {exc.filename}" if exc.filename else ""
        sys.stderr.write(f"{PROG}: error: cannot write{where}: {_one_line(exc.strerror or exc)}\n")
        return 2
    return 0


def run(study: Study, opts: Options) -> Report:
    """Draw everything the study allows into ``opts.out``; returns what was written."""
    report = Report(notices=list(study.notices))
    for notice in study.notices:
        print(f"notice: {notice}")
    styles = variant_styles(study.trials)
    write_accuracy_table(accuracy_table(study, opts), study, opts, report)
    try:
        write_stability_table(*stability_table(study, opts), study, opts, report)
    except Skip as why:
        report.skipped("gradient_stability", why)
    drawers = [
        ("fig1_activations", fig_activations),
        ("fig2_noisy_bn", fig_noisy_bn),
        ("fig3_gradients", fig_gradients),
        ("fig_lr_sensitivity", fig_lr_sensitivity),
        ("fig_histograms", fig_histograms),
        ("fig_probes_ics", fig_probes_ics),
        ("fig_probes_landscape", fig_probes_landscape),
    ]
    for name, draw in drawers:
        try:
            draw(study, opts, styles, report)
        except Skip as why:
            plt.close("all")
            report.skipped(name, why)
    index = write_index(study, opts, report)
    print(f"index: {index} (and index.md)")
    return report


if __name__ == "__main__":
    sys.exit(main())
