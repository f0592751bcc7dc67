"""``batch_spread.csv``: every run's per-layer activation moments per epoch, with the spread of
the per-batch moments across the epoch (``batch_mean_std``, ``batch_var_std``), so that a
number the write-up quotes about them is read from a file, not computed by hand; and
``batch_spread_summary.csv``, each of those over the finished runs (seeds): mean, Student-t
interval, n."""

from __future__ import annotations

import pandas as pd

from analysis.bands import get_interval_estimates
from analysis.load import Study
from analysis.report import Options, Report, Skip
from analysis.tables import run_lengths
from study import results

#: The file's columns: the run (its variant and settings, length in epochs, seed, status), the
#: layer, site and epoch, then the layers table's moments.
COLUMNS = ["variant", "norm", "noise", "noise_scope", "lr", "epochs", "seed", "status", "trial_id",
           "layer", "site", "epoch", "mean", "var", "batch_mean_std", "batch_var_std"]


def batch_spread(study: Study) -> pd.DataFrame:
    """One row per run × layer × site × epoch of the layers table (``COLUMNS``), in variant,
    lr, seed, layer, site and epoch order; runs of every status (``status`` says which)."""
    if study.layers.empty:
        raise Skip("the layers table is empty (no activation statistics recorded)")
    trials = study.trials[["trial_id"]].assign(
        noise_scope=study.trials["noise_scope"] if "noise_scope" in study.trials else None,
        epochs=run_lengths(study.trials).to_numpy())
    # The layers table's weight-norm rows (site "weight") have no activation moments.
    layers = study.layers[study.layers["site"].isin(results.SITES)]
    rows = layers.assign(trial_id=layers["trial_id"].astype(str)).merge(trials, on="trial_id")
    rows = rows.sort_values(["variant", "lr", "seed", "layer", "site", "epoch"], kind="stable")
    out = rows[COLUMNS].reset_index(drop=True)
    for col in ("variant", "norm", "status"):
        out[col] = out[col].astype(str)
    return out


#: The moments summarised over seeds, each a ``quantity`` of the summary.
QUANTITIES = ("mean", "var", "batch_mean_std", "batch_var_std")


def batch_spread_summary(runs: pd.DataFrame, level: float) -> pd.DataFrame:
    """Per variant, noise scope, lr, run length, layer, site, quantity and epoch: the mean of
    ``runs``' values (``batch_spread``) over the finished runs, its Student-t interval at
    ``level`` (lo, hi) and n."""
    done = runs[runs["status"] == "done"]
    long = done.melt(["variant", "noise_scope", "lr", "epochs", "layer", "site", "epoch"],
                     list(QUANTITIES), var_name="quantity")
    return get_interval_estimates(long.fillna({"noise_scope": ""}),
                                  ["variant", "noise_scope", "lr", "epochs", "layer", "site", "quantity"],
                                  "epoch", confidence_interval_size=level).assign(level=level)


def write_batch_spread(study: Study, opts: Options, report: Report) -> None:
    """``batch_spread.csv`` (full precision) and its summary over seeds, listed on the index page."""
    runs = batch_spread(study)
    runs.to_csv(opts.out / "batch_spread.csv", index=False)
    batch_spread_summary(runs, opts.level).to_csv(opts.out / "batch_spread_summary.csv", index=False)
    report.data_files.append((
        "batch_spread.csv",
        "each run's activation mean and variance per conv layer, site (conv output, ReLU input) "
        "and epoch, with the standard deviation across the epoch's batches of each batch's mean "
        "and variance (batch_mean_std, batch_var_std)"))
    report.data_files.append((
        "batch_spread_summary.csv",
        "the same per variant, lr, layer, site and epoch over the finished runs: mean, Student-t "
        "interval (lo, hi) and n"))
    print(f"wrote {opts.out / 'batch_spread.csv'}, batch_spread_summary.csv")
