"""The figures of the probes table (Santurkar et al. 2018): gradient-based internal covariate
shift per layer, and the loss landscape along the gradient."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.captions import lr_words, titled
from analysis.labels import format_number
from analysis.layout import Sheet, require
from analysis.load import Study
from analysis.report import Options, Report, Skip
from analysis.series import at_lr, bin_steps, drawable
from study import results


def _probe_rows(study: Study, opts: Options) -> pd.DataFrame:
    """The drawable probe rows at the figure's learning rate."""
    if study.probes is None or study.probes.empty:
        raise Skip("no probes recorded (probe_every = 0)")
    return require(drawable(at_lr(study.probes, opts.lr)), f"no probe rows at lr {format_number(opts.lr)}")


def fig_probes_ics(study: Study, opts: Options, styles, report: Report) -> None:
    """Gradient-based internal covariate shift per layer over training (Santurkar §2.2)."""
    sel = _probe_rows(study, opts)
    # the first layer has no layers before it: G' = G by definition, nothing to draw
    first = results.PROBE_LAYERS[0]
    layers = [name for name in results.PROBE_LAYERS[1:] if name in set(sel["layer"])]
    layers += sorted(set(sel["layer"].dropna()) - set(layers) - {first})
    if not layers or sel[["ics_l2", "ics_cos"]].isna().all().all():
        raise Skip("the probes hold no ICS values")
    sel = bin_steps(sel)
    per_trial = (
        sel.groupby(["trial_id", "variant", "layer", "step"], observed=True)[["ics_l2", "ics_cos"]]
        .mean()
        .reset_index()
    )
    sheet = Sheet(study, opts, styles, report, 2, len(layers), 3.0 * len(layers) + 0.5, 6.4, sharex=True)
    for r, (col, words) in enumerate((("ics_l2", "‖G − G′‖ (ℓ2)"), ("ics_cos", "cos(G, G′)"))):
        est = sheet.estimate(per_trial, ["variant", "layer"], "step", col)
        clip = (0.0, np.inf) if col == "ics_l2" else (-1.0, 1.0)
        for c, layer in enumerate(layers):
            ax = sheet.axes[r, c]
            sheet.draw(ax, est[est["layer"] == layer], "step", markers=False, clip=clip)
            ax.set_title(f"{layer}: {words}", fontsize=9)
            ax.grid(alpha=0.3)
            if c == 0:
                ax.set_ylabel("ℓ2 difference" if col == "ics_l2" else "cosine similarity")
            if r == 1:
                ax.set_xlabel("training step")
    sheet.save(
        "fig_probes_ics",
        titled("Internal covariate shift (gradient-based) per layer", study, opts),
        "G: a layer's gradient at the probed step; G′: the same gradient after the layers "
        "before it took their update (Santurkar et al. 2018, §2.2). Same batch, BN statistics, "
        "dropout masks and noise held fixed. Bands clipped to the possible range (ℓ2 ≥ 0, "
        "cosine in [-1, 1]). conv1 is not drawn: no layer precedes it, so G′ = G.",
        lr_words(opts),
        legend=sheet.legend(sel, markers=False),
    )


def _range_band(ax, per_trial: pd.DataFrame, lo: str, hi: str, styles) -> None:
    """Each variant's mean over seeds of ``lo`` and ``hi`` per step, and the area between."""
    for variant, g in per_trial.groupby("variant", observed=True, sort=True):
        st = styles[str(variant)]
        g = g.groupby("step")[[lo, hi]].mean().reset_index()
        ax.fill_between(g["step"], g[lo], g[hi], color=st.color, alpha=0.25, lw=0)
        for c in (lo, hi):
            ax.plot(g["step"], g[c], color=st.color, ls=st.linestyle, lw=1.0, label=f"{variant}: {c}")


def fig_probes_landscape(study: Study, opts: Options, styles, report: Report) -> None:
    """Loss landscape along the gradient: raw loss range, the loss change beyond the first-order
    term, gradient predictiveness, β-smoothness."""
    sel = _probe_rows(study, opts)
    cols = ["loss_min", "loss_max", "loss_dev_min", "loss_dev_max", "grad_pred", "beta_smooth"]
    if sel[cols].isna().all().all():
        raise Skip("the probes hold no loss-landscape values")
    sel = bin_steps(sel)
    # The landscape measures are per step (the whole model); average any per-layer rows.
    per_trial = sel.groupby(["trial_id", "variant", "step"], observed=True)[cols].mean()
    per_trial = per_trial.reset_index()
    sheet = Sheet(study, opts, styles, report, 1, 4, 18, 4.6)
    raw, dev = sheet.axes[0, 0], sheet.axes[0, 1]
    _range_band(raw, per_trial, "loss_min", "loss_max", styles)
    raw.set_title("Raw loss L(W − ηg): min–max over η", fontsize=10)
    raw.set_ylabel("loss")
    dev_drawn = per_trial[["loss_dev_min", "loss_dev_max"]].notna().any().any()
    if dev_drawn:
        _range_band(dev, per_trial, "loss_dev_min", "loss_dev_max", styles)
        dev.axhline(0.0, color="0.5", lw=0.6)
    else:
        dev.text(0.5, 0.5, "not recorded\n(results written before this probe)", ha="center",
                 va="center", transform=dev.transAxes, fontsize=9, color="0.4")
    dev.set_title("Beyond first order: L(W − ηg) − L(W) + η‖g‖², min–max over η", fontsize=9)
    dev.set_ylabel("loss change − first-order term")
    for ax, (col, words, label) in zip(
        sheet.axes[0, 2:],
        (
            ("grad_pred", "Gradient predictiveness: ℓ2 change of the gradient", "ℓ2 change"),
            ("beta_smooth", "Effective β-smoothness: the change ÷ ‖ηg‖", "β"),
        ),
        strict=True,
    ):
        sheet.draw(ax, sheet.estimate(per_trial, ["variant"], "step", col), "step", markers=False, log=True)
        ax.set_title(words, fontsize=10)
        ax.set_ylabel(label)
    for ax in sheet.axes[0]:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    sheet.save(
        "fig_probes_landscape",
        titled("Loss landscape along the gradient, as in Santurkar et al. 2018, §3", study, opts),
        "First: the range (min to max) of the loss when stepping along the gradient by each "
        "probed η, mean over seeds (the shaded area is that range, not an interval); at these "
        "step sizes it is mostly the first-order decrease η‖g‖², so it restates the gradient "
        "norm. Second: the same loss change less that first-order term, the part due to the "
        "landscape's curvature (½η²gᵀHg on a quadratic)"
        + ("" if dev_drawn else "; not recorded in these results") + ". Third and fourth: "
        "gradient predictiveness (max over η of ‖∇L(W − ηg) − g‖) and effective β-smoothness "
        "(the same ÷ ‖ηg‖), log scale.",
        lr_words(opts),
        legend=sheet.legend(sel, markers=False),
    )
