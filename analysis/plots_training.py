"""The figures of how training went: the gradient norm over iterations (figure 3, the steps
table), the final accuracy against the learning rate (the trials' final epochs), and the
accuracy of each variant minus a reference's over epochs, paired by seed."""

from __future__ import annotations

import math

import pandas as pd
from matplotlib.lines import Line2D

from analysis import bands
from analysis.captions import excluded_words, lr_words, titled
from analysis.labels import format_number, percent_scale, variant_label
from analysis.layout import Sheet, require
from analysis.load import Study
from analysis.paired import paired_curves
from analysis.panel import integer_ticks
from analysis.report import Options, Report, Skip
from analysis.roles import REFERENCE_NORMS
from analysis.series import MAX_POINTS, at_lr, drawable, smoothed_step_curves, variants_in
from analysis.tables import final_accuracies
from study import results

#: The steps-table columns figure 3 draws, one panel each: the global norm, then each layer's.
STEP_PANELS = ("grad_norm", *(f"grad_norm_{name}" for name in results.GRAD_LAYERS))


def fig_gradients(study: Study, opts: Options, styles, report: Report) -> None:
    """Figure 3: global and per-layer gradient norm over iterations, smoothed, with bands."""
    if study.steps.empty:
        raise Skip("the steps table is empty (no per-step gradient norms recorded)")
    with_rows = set(study.steps.trial_ids)
    trials = at_lr(study.trials, opts.lr)
    trials = trials[trials["trial_id"].isin(with_rows)]
    require(trials, f"no per-step gradient norms at lr {format_number(opts.lr)}")
    ids = set(require(drawable(trials), "no finished or running runs to draw (all diverged or "
                      "failed)")["trial_id"])
    columns = [c for c in STEP_PANELS if c in study.steps]
    present: dict[str, bool] = {}
    # read a trial at a time: the steps table of a large study does not fit in memory
    curves = smoothed_step_curves(lambda cols: study.steps.frames(ids, cols), columns, opts.smooth,
                                  study.trials.set_index("trial_id")["grad_every"], present=present)
    panels = [c for c in columns if present[c]]
    ncols = 3
    nrows = math.ceil(len(panels) / ncols)
    sheet = Sheet(study, opts, styles, report, nrows, ncols, 13, 3.3 * nrows + 0.4, sharex=True)
    for ax, col in zip(sheet.axes.flat, panels, strict=False):
        est = sheet.estimate(curves, ["variant"], "step", col)
        sheet.draw(ax, est, "step", markers=False, log=True)
        name = "all weights (global)" if col == "grad_norm" else col.removeprefix("grad_norm_")
        ax.set_title(f"Gradient ℓ2 norm: {name}", fontsize=10)
        ax.set_ylabel("gradient norm")
        ax.grid(alpha=0.3, which="both")
    for ax in sheet.axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax in sheet.axes[-1]:
        ax.set_xlabel("training iteration (step)")
    sheet.save(
        "fig3_gradients",
        titled("Figure 3 — Gradient norm over training iterations", study, opts),
        f"Gradient ℓ2 norm after backward(), before the optimiser step; per run a trailing "
        f"moving average over {opts.smooth} steps (--smooth), then averaged into at most "
        f"{MAX_POINTS} step bins before the bands across seeds. Log scale (band edges below "
        "half the smallest mean, those at or below zero included, drawn there).",
        lr_words(opts),
        excluded_words(study, opts),
        legend=sheet.legend(curves, markers=False),
    )


def fig_lr_sensitivity(study: Study, opts: Options, styles, report: Report) -> None:
    """Final train and test accuracy against learning rate per variant; diverged runs marked."""
    if len(study.lrs) < 2:
        raise Skip(f"needs at least two learning rates (the study has {len(study.lrs)})")
    final = final_accuracies(study)
    done = require(final[final["status"] == "done"], "no finished runs yet")
    scale = percent_scale(done[["train_acc", "test_acc"]].to_numpy())
    done = done.assign(train=done["train_acc"] * scale, test=done["test_acc"] * scale)
    diverged = final[final["status"] == "diverged"].groupby(["variant", "lr"], observed=True).size()
    sheet = Sheet(study, opts, styles, report, 1, 2, 12, 4.8)
    for ax, (col, words) in zip(
        sheet.axes[0],
        (
            ("train", "Final training accuracy (running over the last epoch)"),
            ("test", "Final test accuracy"),
        ),
        strict=True,
    ):
        sheet.draw(ax, sheet.estimate(done, ["variant"], "lr", col), "lr", markers=True, clip=(0.0, 100.0))
        ax.set_xscale("log")
        ax.set_xticks(study.lrs, [format_number(x) for x in study.lrs])
        ax.minorticks_off()
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel("accuracy (%)" if scale == 100 else "accuracy")
        ax.set_title(words, fontsize=10)
        ax.grid(alpha=0.3)
        if len(diverged):
            _mark_diverged(ax, diverged, study.variants, styles)
    legend = sheet.legend(final, markers=True)
    if len(diverged):
        legend.append(Line2D([], [], color="0.3", marker="x", ls="none", ms=8, mew=2,
                             label="diverged runs (count), in the shaded strip"))
    sheet.save(
        "fig_lr_sensitivity",
        titled("Final accuracy against learning rate", study, opts, one_lr=False),
        "Points: mean over the runs that finished at each learning rate; bands clipped to "
        "[0, 100]\u00a0%.",
        "A cross in the shaded strip at the bottom marks diverged runs (non-finite loss) with "
        "their count; they are not in the means."
        if len(diverged)
        else "No run diverged.",
        legend=legend,
    )


def _mark_diverged(ax, diverged, variants: list[str], styles) -> None:
    """A shaded strip below the data, so that a cross is never read as an accuracy, with a cross
    and the count of each variant's diverged runs (``diverged``: per variant and lr) in it."""
    bottom, top = ax.get_ylim()
    strip = 0.045 * (1 + len(variants)) * (top - bottom)
    ticks = [t for t in ax.get_yticks() if bottom <= t <= top]  # no accuracy ticks in it
    ax.set_ylim(bottom - strip, top)
    ax.set_yticks(ticks)
    ax.axhspan(bottom - strip, bottom, color="0.92", lw=0, zorder=0)
    ax.text(0.005, bottom - strip / 2, "diverged", transform=ax.get_yaxis_transform(),
            rotation=90, va="center", ha="left", fontsize=7, color="0.4")
    for (variant, lr), k in diverged.items():
        st = styles[str(variant)]
        y = bottom - strip * (1 + variants.index(str(variant))) / (1 + len(variants))
        ax.plot([lr], [y], marker="x", color=st.color, ms=7, mew=2, ls="none")
        ax.text(lr, y, f"  {k}", color=st.color, va="center", fontsize=8)


def fig_accuracy_differences(study: Study, opts: Options, styles, report: Report) -> None:
    """Train and test accuracy per epoch of each variant minus a reference's (no BN, then BN
    for the noisy variants), the per-seed differences' mean with its paired t band."""
    lr = format_number(opts.lr)
    epochs = drawable(require(at_lr(study.epochs, opts.lr), f"no accuracy per epoch at lr {lr}"))
    scale = percent_scale(epochs[["train_acc", "test_acc"]].to_numpy())
    acc = epochs.assign(train=epochs["train_acc"] * scale, test=epochs["test_acc"] * scale)
    present = set(variants_in(acc))
    rows = []  # (reference, its norm's successors in the registry that the study has)
    for i, norm in enumerate(REFERENCE_NORMS):
        reference = variant_label(norm, 0.0)
        others = variants_in(acc[~acc["norm"].isin(REFERENCE_NORMS[: i + 1])])
        if reference in present and others:
            rows.append((reference, others))
    if not rows:
        raise Skip(f"needs runs of a reference ({', '.join(REFERENCE_NORMS)}) and of another "
                   f"variant at lr {lr}")
    sheet = Sheet(study, opts, styles, report, len(rows), 2, 12, 3.6 * len(rows) + 1.4, sharex=True)
    ns = []
    for r, (reference, others) in enumerate(rows):
        for c, (col, words) in enumerate((("train", "training accuracy (running over the epoch)"),
                                          ("test", "test accuracy"))):
            part = acc[acc["variant"].astype(str).isin([reference, *others])]
            est = paired_curves(part, col, "epoch", reference, opts.level)
            est["variant"] = pd.Categorical(est["variant"], categories=study.variants, ordered=True)
            ns += est["n"].tolist()
            ax = sheet.axes[r, c]
            sheet.draw(ax, est, "epoch", markers=True)
            ax.axhline(0, color="0.6", lw=0.8, zorder=0)
            ax.set_title(f"{words[0].upper() + words[1:]}: variant − {reference}", fontsize=10)
            ax.set_ylabel("difference (points)" if scale == 100 else "difference")
            ax.grid(alpha=0.3)
            integer_ticks(ax)
    for ax in sheet.axes[-1]:
        ax.set_xlabel("epoch")
    level = f"{opts.level * 100:g}%"
    sheet.save(
        "fig_accuracy_differences",
        titled("Accuracy differences between variants, paired by seed", study, opts),
        f"Lines: the mean over seeds of each seed's accuracy minus the reference's of the same "
        f"seed (for a given seed the variants share their initial weights, data order, "
        f"augmentation and dropout masks); bands: its {level} paired Student-t interval, "
        f"whatever --ci ({bands.describe_n(ns)}: the seeds both variants have at that epoch). "
        "A band that excludes 0 is a difference those seeds resolve. Train accuracy is the "
        "running average over the epoch; comparisons.csv gives the last epoch's differences.",
        lr_words(opts),
        excluded_words(study, opts),
        legend=sheet.legend(acc[acc["variant"].astype(str).isin(
            [v for _, others in rows for v in others])], markers=True),
    )
