"""The figures of the activations (the layers table): their mean and variance per layer over
epochs (figure 1: the variants without noise; figure 2: the noisy ones beside them, with
accuracy and the per-batch spread), and their distributions over epochs (the histograms)."""

from __future__ import annotations

import json

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from analysis import bands
from analysis.captions import excluded_words, lr_words, titled
from analysis.labels import format_number, percent_scale
from analysis.layout import Sheet, require
from analysis.load import Study
from analysis.panel import integer_ticks
from analysis.report import Options, Report, Skip
from analysis.roles import BASELINE_NORM, NOISY_NORMS_IN_ORDER, REFERENCE_NORMS
from analysis.series import at_lr, drawable, histogram_densities, variants_in
from study import results

SITE_WORDS = {
    "preact": "ReLU input (after norm)",
    "conv": "conv output (before norm)",
}


def _named(norms: tuple[str, ...], joint: str) -> str:
    """``BN (batch)``: each variant's label and name."""
    return f" {joint} ".join(f"{results.VARIANTS[n].label} ({n})" for n in norms)


def _runs_with_and_without() -> str:
    """``with BN (batch) and without (none)``: the references that normalise, then the baseline."""
    normalised = tuple(n for n in REFERENCE_NORMS if n != BASELINE_NORM)
    with_ = [f"with {_named(normalised, 'and')}"] if normalised else []
    return " and ".join([*with_, f"without ({BASELINE_NORM})"])


#: Figure 2's rows of the per-batch spread (layers table columns): what each is the spread of.
SPREAD_WORDS = {"batch_mean_std": "per-batch mean", "batch_var_std": "per-batch variance"}


def _spread_axes(ax, stat: str, layer: str) -> None:
    ax.set_ylabel(f"sd of {SPREAD_WORDS[stat]}")
    ax.set_title(f"{layer}: spread of the {SPREAD_WORDS[stat]}, ReLU input", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    integer_ticks(ax)


def _activation_axes(ax, stat: str, site: str, layer: str) -> None:
    word = "mean" if stat == "mean" else "variance"
    ax.set_ylabel(f"{word} of {SITE_WORDS[site].split(' (')[0]}")
    ax.set_title(f"{layer}: {word}, {SITE_WORDS[site]}", fontsize=9)
    ax.grid(alpha=0.3)
    if stat == "mean":
        ax.axhline(0, color="0.6", lw=0.8, zorder=0)
    integer_ticks(ax)


def fig_activations(study: Study, opts: Options, styles, report: Report) -> None:
    """Figure 1: activation mean and variance per layer over epochs of the variants without
    noise (``REFERENCE_NORMS``: BN vs no BN)."""
    lr = format_number(opts.lr)
    sel = require(at_lr(study.layers, opts.lr), f"no activation statistics at lr {lr} yet")
    sel = sel[sel["norm"].isin(REFERENCE_NORMS)]
    missing = sorted(set(REFERENCE_NORMS) - set(sel["norm"].astype(str)))
    if missing:
        raise Skip(f"needs runs {_runs_with_and_without()} at lr {lr}; missing: {', '.join(missing)}")
    drawn = require(drawable(sel), "no finished or running BN / no-BN runs to draw (all diverged or failed)")
    layers = [name for name in results.ACT_LAYERS if name in set(drawn["layer"])]
    rows = [("preact", "mean"), ("preact", "var"), ("conv", "mean"), ("conv", "var")]
    sheet = Sheet(study, opts, styles, report, len(rows), len(layers), 3.6 * len(layers), 10.5,
                  sharex=True)
    for r, (site, stat) in enumerate(rows):
        est = sheet.estimate(drawn[drawn["site"] == site], ["variant", "layer"], "epoch", stat)
        for c, layer in enumerate(layers):
            ax = sheet.axes[r, c]
            sheet.draw(ax, est[est["layer"] == layer], "epoch", markers=True, log=stat == "var")
            _activation_axes(ax, stat, site, layer)
            if r == len(rows) - 1:
                ax.set_xlabel("epoch")
    sheet.save(
        "fig1_activations",
        titled("Figure 1 — Activation mean and variance per conv layer over training: BN vs no BN",
               study, opts, REFERENCE_NORMS),
        "Mean and variance over all activations of each epoch's training batches; top two rows: "
        "the ReLU input (after the norm), bottom two: the conv output (before the norm); "
        "without BN both are the same. Variance on a log scale (band edges below half the "
        "smallest mean, those at or below zero included, drawn there).",
        lr_words(opts),
        excluded_words(study, opts, REFERENCE_NORMS),
        legend=sheet.legend(drawn, markers=True),
    )


def fig_noisy_bn(study: Study, opts: Options, styles, report: Report) -> None:
    """Figure 2: the activations of the noisy variants and of those without noise (no BN, BN,
    noisy BN: every registered variant) beside their accuracy curves, and below them the
    spread of the per-batch moments across each epoch (``SPREAD_WORDS``)."""
    lr = format_number(opts.lr)
    sel = require(at_lr(study.layers, opts.lr), f"no activation statistics at lr {lr} yet")
    sel = sel[sel["norm"].isin(results.NORMS) & (sel["site"] == "preact")]
    if not set(NOISY_NORMS_IN_ORDER) & set(sel["norm"].astype(str)):
        raise Skip(f"needs {_named(NOISY_NORMS_IN_ORDER, 'or')} runs at lr {lr}")
    drawn = drawable(sel)
    all_epochs = require(at_lr(study.epochs, opts.lr), f"no accuracy per epoch (epochs table) at lr {lr}")
    epochs = drawable(all_epochs)
    epochs = epochs[epochs["norm"].isin(results.NORMS)]
    if drawn.empty or epochs.empty:
        raise Skip("no finished or running runs to draw (all diverged or failed)")
    layers = [name for name in results.ACT_LAYERS if name in set(drawn["layer"])]
    ncols = len(layers) + 1
    sheet = Sheet(study, opts, styles, report, 2 + len(SPREAD_WORDS), ncols, 3.4 * ncols, 12.4,
                  sharex=True)
    axes = sheet.axes
    for r, stat in enumerate(("mean", "var", *SPREAD_WORDS)):
        est = sheet.estimate(drawn, ["variant", "layer"], "epoch", stat)
        for c, layer in enumerate(layers):
            sheet.draw(axes[r, c], est[est["layer"] == layer], "epoch", markers=True, log=stat != "mean")
            if stat in SPREAD_WORDS:
                _spread_axes(axes[r, c], stat, layer)
            else:
                _activation_axes(axes[r, c], stat, "preact", layer)
    scale = percent_scale(epochs[["train_acc", "test_acc"]].to_numpy())
    acc = epochs.assign(train=epochs["train_acc"] * scale, test=epochs["test_acc"] * scale)
    for r, (col, words) in enumerate(
        (("train", "training accuracy (running over the epoch)"), ("test", "test accuracy"))
    ):
        est = sheet.estimate(acc, ["variant"], "epoch", col)
        ax = axes[r, ncols - 1]
        sheet.draw(ax, est, "epoch", markers=True, clip=(0.0, 100.0))
        ax.set_title(words[0].upper() + words[1:], fontsize=9)
        ax.set_ylabel("accuracy (%)" if scale == 100 else "accuracy")
        ax.grid(alpha=0.3)
    for ax in axes[2:, ncols - 1]:
        ax.set_visible(False)
    for ax in (*axes[-1, : ncols - 1], axes[1, ncols - 1]):
        ax.set_xlabel("epoch")
        ax.xaxis.set_tick_params(labelbottom=True)
        integer_ticks(ax)
    sheet.save(
        "fig2_noisy_bn",
        titled("Figure 2 — Noisy BatchNorm: activation distribution vs accuracy", study, opts),
        "Top two rows, left: mean and variance (log scale) of each conv layer's ReLU input "
        "(after the norm and, for noisy BN, after the injected noise) over all of an epoch's "
        "training batches. Right: training accuracy (running average over the epoch, as the "
        "seed reports it) and test accuracy. Bottom two rows: the standard deviation across "
        "the epoch's training batches of each batch's mean and variance of the same tensor (batch_mean_std, "
        "batch_var_std; log scale): how much it moves from step to step, which the epoch's "
        "moments above hide. For noisy BN this spread includes the injected noise itself "
        "(a per-layer or per-channel shift μ ~ U(−noise/2, noise/2) drawn each step). Bands "
        "are clipped to what the quantity can take (variance > 0, accuracy in [0, 100]\u00a0%).",
        lr_words(opts),
        excluded_words(study, opts, results.NORMS),
        legend=sheet.legend(drawn, markers=True),
    )


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


def _histogram_panel(ax, dens: np.ndarray, edges: np.ndarray, rows_by_epoch: list[np.ndarray],
                     shades: np.ndarray, color) -> list[float]:
    """One layer's densities of one variant, light to dark by epoch (``rows_by_epoch``: the
    seeds' rows of ``dens``); returns where the density is visible, [] where nowhere."""
    centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    base = np.array(mcolors.to_rgb(color))
    peak_bins, outer = [], 0.0
    for rows, shade in zip(rows_by_epoch, shades, strict=True):
        if not len(rows):
            continue
        d = np.nanmean(dens[rows], axis=0)
        # The outer bins also hold the clamped tails: their height is not a density.
        outer = max(outer, float((d[[0, -1]] * width[[0, -1]]).sum()))
        d = d.copy()
        d[[0, -1]] = np.nan
        ax.plot(centers, d, color=1 - shade * (1 - base), lw=1.4)
        peak_bins.append(d)
    if outer >= 0.005:
        ax.text(0.98, 0.95, f"outer bins: up to {outer:.0%}", transform=ax.transAxes, ha="right",
                va="top", fontsize=7, color="0.3")
    if not peak_bins:
        return []
    stack = np.nan_to_num(np.vstack(peak_bins)).max(axis=0)
    visible = np.flatnonzero(stack > 2e-3 * stack.max())
    return [edges[visible[0]], edges[visible[-1] + 1]] if len(visible) else []


def fig_histograms(study: Study, opts: Options, styles, report: Report) -> None:
    """Activation distributions (ReLU input) over epochs: rows layers, columns variants."""
    sel = at_lr(study.layers, opts.lr)
    sel = drawable(sel[(sel["site"] == "preact") & sel["hist"].notna()])
    sel = require(sel[sel["hist"].map(len) > 0], f"no activation histograms at lr {format_number(opts.lr)}")
    edges, dens = histogram_densities(sel)
    keys = sel[["variant", "layer", "epoch"]].astype({"variant": str}).reset_index(drop=True)
    keys["row"] = np.arange(len(keys))
    all_epochs = sorted(sel["epoch"].unique())
    shown = sorted(
        {all_epochs[int(round(i))] for i in np.linspace(0, len(all_epochs) - 1, min(5, len(all_epochs)))}
    )
    variants = variants_in(sel)
    layers = [name for name in results.ACT_LAYERS if name in set(sel["layer"])]
    sheet = Sheet(study, opts, styles, report, len(layers), len(variants), 2.9 * len(variants) + 0.6,
                  2.4 * len(layers) + 0.6)
    shades = np.linspace(0.4, 1.0, len(shown)) if len(shown) > 1 else np.ones(1)  # one epoch: full colour
    n_seeds = []
    visible_range: dict[int, list[float]] = {}
    for c, variant in enumerate(variants):
        for r, layer in enumerate(layers):
            ax = sheet.axes[r, c]
            part = keys[(keys["variant"] == variant) & (keys["layer"] == layer)]
            rows_by_epoch = [part.loc[part["epoch"] == epoch, "row"].to_numpy() for epoch in shown]
            n_seeds += [len(rows) for rows in rows_by_epoch if len(rows)]
            visible = _histogram_panel(ax, dens, edges, rows_by_epoch, shades, styles[variant].color)
            if visible:
                span = visible_range.setdefault(r, [np.inf, -np.inf])
                span[0], span[1] = min(span[0], visible[0]), max(span[1], visible[1])
            ax.set_title(f"{variant} — {layer}", fontsize=9)
            ax.grid(alpha=0.3)
            if c == 0:
                ax.set_ylabel("density")
            if r == len(layers) - 1:
                ax.set_xlabel("ReLU input value")
    for r, (a, b) in visible_range.items():
        pad = 0.05 * (b - a)
        for ax in sheet.axes[r]:
            ax.set_xlim(a - pad, b + pad)
    sheet.save(
        "fig_histograms",
        titled("Activation distributions over training: ReLU input, after the norm", study, opts),
        f"Each panel: the histogram of all ReLU inputs of a layer in {_histogram_batches(study)} "
        f"of an epoch, normalised to a density and averaged over seeds "
        f"({bands.describe_n(n_seeds, per='curve', band=False)}); light to dark = early to late "
        f"epochs. The two outermost bins of [{format_number(edges[0])}, "
        f"{format_number(edges[-1])}] also hold the values beyond that range, so they are not "
        "drawn; where they hold 0.5% or more, the panel says how much. The x range, shared "
        "along a row, is cut to where the density is visible.",
        lr_words(opts),
        excluded_words(study, opts),
        legend=[Line2D([], [], color=str(1 - 0.85 * s), lw=2, label=f"epoch {e}")
                for e, s in zip(shown, shades, strict=True)],
    )
