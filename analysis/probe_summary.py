"""The numbers the probe reading quotes, each as CSV (docs/design.md, "Analysis outputs"):
per run, the median of each probe quantity over a window of steps (``--window``) and their
mean over seeds with its Student-t interval; and per run, layer and epoch, the weight norms of
the layers table.

A run's median over its probed steps, not the mean: the probes of a run jump from step to step
(a batch with a large gradient), and one jump would move a mean over a few dozen probes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis import bands
from analysis.comparisons import comparisons
from analysis.labels import format_number
from analysis.load import Study
from analysis.paired import PAIRED
from analysis.report import Options, Report, Skip, StepWindow
from study import results

#: Probe quantities that belong to the step (one value per probed step, repeated on each
#: layer's row), with the words the index uses; the ranges are derived here (max - min over η).
STEP_QUANTITIES: dict[str, str] = {
    "loss_range": "raw loss range over η",
    "loss_dev_range": "loss change beyond first order, range over η",
    "loss_min": "raw loss, min over η",
    "loss_max": "raw loss, max over η",
    "loss_dev_min": "loss change beyond first order, min over η",
    "loss_dev_max": "loss change beyond first order, max over η",
    "grad_pred": "gradient predictiveness",
    "beta_smooth": "effective β-smoothness",
    "first_order_share": "share of the raw loss range the first-order term explains",
}
#: Probe quantities of each layer.
LAYER_QUANTITIES: tuple[str, ...] = ("ics_l2", "ics_cos", "weight_norm")
#: The step quantities the index page shows, in its order.
SHOWN: tuple[str, ...] = ("loss_range", "loss_dev_range", "grad_pred", "beta_smooth")
RUN_KEYS: list[str] = ["variant", "lr", "noise", "epochs", "seed"]


#: The ``layer`` of a quantity of the whole model (the step quantities).
MODEL = "model"


def _with_run_columns(study: Study, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with each trial's run length (``epochs``)."""
    epochs = study.trials.set_index("trial_id")["epochs"]
    return frame.assign(epochs=frame["trial_id"].astype(str).map(epochs).to_numpy())


def _long_probes(study: Study) -> pd.DataFrame:
    """The probes table in long form: one row per (trial, step, layer, quantity) with ``value``;
    step quantities once per step, with layer MODEL."""
    p = _with_run_columns(study, study.probes)
    p = p.assign(loss_range=p["loss_max"] - p["loss_min"],
                 loss_dev_range=p["loss_dev_max"] - p["loss_dev_min"])
    # 1 when the loss along −g is all first-order decrease η‖g‖² (the raw range restates ‖g‖)
    p = p.assign(first_order_share=1 - p["loss_dev_range"] / p["loss_range"])
    keys = ["trial_id", *RUN_KEYS, "status", "step"]
    per_step = p.groupby(keys, observed=True, sort=False)[list(STEP_QUANTITIES)].first().reset_index()
    step_long = per_step.melt(keys, var_name="quantity", value_name="value").assign(layer=MODEL)
    layer_long = p[[*keys, "layer", *LAYER_QUANTITIES]].melt([*keys, "layer"], var_name="quantity",
                                                             value_name="value")
    layer_long["layer"] = layer_long["layer"].astype(str)
    return pd.concat([step_long, layer_long], ignore_index=True)


def probe_window_medians(study: Study, window: StepWindow) -> pd.DataFrame:
    """Per run, layer and quantity: the median over the probed steps in ``window`` of the
    finite values, and how many steps that is (``n_steps``). Runs with no finite value in the
    window are left out. Columns: ``RUN_KEYS``, status, layer ('' for a step quantity),
    quantity, median, n_steps, window."""
    if study.probes is None or study.probes.empty:
        raise Skip("no probes recorded (probe_every = 0)")
    long = _long_probes(study)
    long = long[window.holds(long["step"].to_numpy()) & np.isfinite(long["value"].to_numpy(float))]
    if long.empty:
        raise Skip(f"no probed step in the window {window.label}")
    keys = [*RUN_KEYS, "status", "layer", "quantity"]
    out = long.groupby(keys, observed=True, sort=True)["value"].agg(median="median", n_steps="count")
    return out.reset_index().assign(window=window.label)


def probe_window_summary(medians: pd.DataFrame, level: float) -> pd.DataFrame:
    """Per variant, lr, noise, run length, layer and quantity: the mean over the finished runs
    (status done) of their medians, its Student-t interval at ``level`` (lo, hi) and n."""
    done = medians[medians["status"] == "done"]
    keys = ["variant", "lr", "noise", "epochs", "layer", "quantity"]
    rows = []
    for key, group in done.groupby(keys, sort=True, observed=True):
        mean, lo, hi = bands.t_interval(group["median"].to_numpy(float), level)
        rows.append((*key, mean, lo, hi, int(group["median"].notna().sum())))
    out = pd.DataFrame(rows, columns=[*keys, "mean", "lo", "hi", "n"])
    if isinstance(medians["variant"].dtype, pd.CategoricalDtype):  # keep the display order
        out["variant"] = pd.Categorical(out["variant"], dtype=medians["variant"].dtype)
    return out.assign(level=level, window=medians["window"].iloc[0] if len(medians) else "")


def probe_comparisons(medians: pd.DataFrame, level: float) -> pd.DataFrame:
    """Every pair of variants at the same (lr, epochs): the mean difference A − B of the
    finished runs' window medians of each step quantity, paired on seed
    (``analysis.comparisons.comparisons``: paired Student-t, Welch's where a seed lacks its
    partner).

    Args:
      medians: ``probe_window_medians``.
      level: Coverage of each interval, in (0, 1).

    Returns:
      The comparisons' long table (``analysis.comparisons.COLUMNS``), ``metric`` a step
      quantity, with the window.
    """
    step = medians[(medians["layer"] == MODEL) & (medians["status"] == "done")]
    if step.empty:
        raise Skip("no finished run has probes in the window")
    keys = ["variant", "lr", "epochs", "seed"]
    wide = step.pivot_table(index=keys, columns="quantity", values="median", observed=True).reset_index()
    wide["variant"] = pd.Categorical(wide["variant"].astype(str), dtype=medians["variant"].dtype) \
        if isinstance(medians["variant"].dtype, pd.CategoricalDtype) else wide["variant"]
    long, _ = comparisons(wide, level, metrics=list(STEP_QUANTITIES))
    if long.empty:
        raise Skip("no two variants have finished probed runs at the same learning rate and length")
    return long.assign(window=medians["window"].iloc[0])


def weight_norms(study: Study) -> pd.DataFrame:
    """Per run, weight layer and epoch, the weight's ℓ2 norm at the epoch's end (the layers
    table's ``weight`` rows)."""
    rows = study.layers[study.layers["site"] == results.WEIGHT_SITE]
    if "weight_norm" not in rows or rows["weight_norm"].notna().sum() == 0:
        raise Skip("the layers table holds no weight norms (results written before they were recorded)")
    rows = _with_run_columns(study, rows)
    cols = ["variant", "lr", "noise", "epochs", "seed", "status", "layer", "epoch", "weight_norm"]
    out = rows[cols].assign(layer=rows["layer"].astype(str), status=rows["status"].astype(str))
    return out.sort_values(["variant", "lr", "noise", "seed", "layer", "epoch"], kind="stable")


def write_probe_window(study: Study, opts: Options, report: Report) -> None:
    """probe_window.csv (per run) and probe_window_summary.csv (over seeds), with the step
    quantities' summary on the index page."""
    medians = probe_window_medians(study, opts.window)
    summary = probe_window_summary(medians, opts.level)
    medians.to_csv(opts.out / "probe_window.csv", index=False)
    summary.to_csv(opts.out / "probe_window_summary.csv", index=False)
    shown = summary[summary["quantity"].isin(SHOWN)]
    header = ["variant", "lr", "epochs", *(STEP_QUANTITIES[q] for q in SHOWN), "n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (variant, lr, epochs), g in shown.groupby(["variant", "lr", "epochs"], sort=True, observed=True):
        by_q = g.set_index("quantity")
        cells = [f"{by_q.at[q, 'mean']:.4g} [{by_q.at[q, 'lo']:.4g}, {by_q.at[q, 'hi']:.4g}]"
                 if q in by_q.index else "–" for q in SHOWN]
        lines.append("| " + " | ".join([str(variant), format_number(lr), str(epochs), *cells,
                                        str(int(by_q["n"].max()))]) + " |")
    note = (f"Per run, the median over its probed steps in {opts.window.words} of each quantity; "
            f"here their mean over the n finished runs, [Student-t {opts.level:.0%} interval]. "
            "Loss change beyond first order: L(W − ηg) − L(W) + η‖g‖². Every quantity, layer and "
            "run: probe_window.csv, probe_window_summary.csv.")
    report.tables.append(("Probes over a window of steps", "\n".join(lines) + "\n\n" + note + "\n",
                          ["probe_window.csv", "probe_window_summary.csv"]))
    print(f"wrote {opts.out / 'probe_window.csv'}, probe_window_summary.csv")
    try:
        pairs = probe_comparisons(medians, opts.level)
    except Skip as why:
        report.skipped("probe_comparisons", why)
        return
    pairs.to_csv(opts.out / "probe_comparisons.csv", index=False)
    report.tables.append(("Probes compared between variants", _pairs_markdown(pairs, opts),
                          ["probe_comparisons.csv"]))
    print(f"wrote {opts.out / 'probe_comparisons.csv'}")


def _pairs_markdown(pairs: pd.DataFrame, opts: Options) -> str:
    """The index page's table of ``probe_comparisons``: a row per pair, lr and length, a
    ``mean [lo, hi] (n)`` cell per shown quantity."""
    header = ["A − B", "lr", "epochs", *(STEP_QUANTITIES[q] for q in SHOWN), "method"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (pair, lr, epochs), g in pairs.groupby(["pair", "lr", "epochs"], sort=False):
        by_q = g.set_index("metric")
        cells = []
        for q in SHOWN:
            r = by_q.loc[q] if q in by_q.index else None
            if r is not None:
                n = f"({int(r['n'])})" if r["method"] == PAIRED else f"({r['n_a']} vs {r['n_b']})"
            cells.append("–" if r is None or not np.isfinite(r["mean"]) else
                         f"{r['mean']:.4g} [{r['lo']:.4g}, {r['hi']:.4g}] {n}")
        lines.append("| " + " | ".join([str(pair), format_number(lr), str(epochs), *cells,
                                        " / ".join(dict.fromkeys(g["method"]))]) + " |")
    return ("\n".join(lines) + f"\n\nPer run, the median of each quantity over its probed steps in "
            f"{opts.window.words}; here the mean difference A − B of those medians [its {opts.level:.0%} "
            "Student-t interval] (n): paired t over the seeds both variants ran, Welch t where a seed "
            "lacks its partner. Every quantity: probe_comparisons.csv.\n")


def weight_norms_summary(runs: pd.DataFrame, level: float) -> pd.DataFrame:
    """Per variant, lr, noise, run length, layer and epoch: the mean of ``runs``' weight norms
    (``weight_norms``) over the finished runs, its Student-t interval at ``level`` and n."""
    done = runs[runs["status"] == "done"]
    return bands.get_interval_estimates(done, ["variant", "lr", "noise", "epochs", "layer"], "epoch",
                                        "weight_norm", confidence_interval_size=level).assign(level=level)


def write_weight_norms(study: Study, opts: Options, report: Report) -> None:
    """weight_norms.csv: every run's weight norms per layer and epoch; weight_norms_summary.csv:
    their mean over seeds."""
    table = weight_norms(study)
    table.to_csv(opts.out / "weight_norms.csv", index=False)
    weight_norms_summary(table, opts.level).to_csv(opts.out / "weight_norms_summary.csv", index=False)
    report.tables.append(("Weight norms", "Per run, weight layer (conv1–3, fc1, fc2) and epoch: the "
                          "ℓ2 norm of the layer's weight at the epoch's end; over the finished runs, "
                          "mean, Student-t interval and n: weight_norms_summary.csv.\n",
                          ["weight_norms.csv", "weight_norms_summary.csv"]))
    print(f"wrote {opts.out / 'weight_norms.csv'}, weight_norms_summary.csv")
