"""``noise_eval_summary.csv``: noisy BN's test accuracy as trained and with its noise's mean
scale (``python -m study.noise_eval`` writes each trial's two in the results folder), per
variant, lr and run length over the seeds, with the gain of the mean scale paired on the run.

The gain is paired because both accuracies are the same checkpoint evaluated twice: what the
seeds share cancels, and its interval is that of the per-run differences.
"""

from __future__ import annotations

import pandas as pd

from analysis.bands import t_interval
from analysis.labels import format_number
from analysis.load import Study
from analysis.paired import paired_difference
from analysis.report import Options, Report, Skip
from analysis.tables import _md_table, run_lengths
from study import results

COLUMNS = ["variant", "lr", "epochs", "n", "expected_scale", "test_acc", "test_acc_lo", "test_acc_hi",
           "mean_scaled", "mean_scaled_lo", "mean_scaled_hi", "gain", "gain_lo", "gain_hi",
           "gain_min", "gain_max", "level"]


def read_noise_eval(study: Study) -> pd.DataFrame:
    """Every results folder's ``noise_eval.csv``, joined with the trials it names (finished
    ones only): ``variant``, ``lr``, ``epochs``, ``seed`` and the file's columns."""
    files = [root / results.NOISE_EVAL_FILE for root in study.paths]
    files = [f for f in files if f.is_file()]
    if not files:
        raise Skip(f"no {results.NOISE_EVAL_FILE} (run python -m study.noise_eval on the folder)")
    evals = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    trials = study.trials.assign(trial_id=study.trials["trial_id"].astype(str),
                                 epochs=run_lengths(study.trials).to_numpy())
    trials = trials[trials["status"].astype(str) == "done"][["trial_id", "variant", "lr", "epochs", "seed"]]
    joined = trials.merge(evals, on="trial_id", how="inner")
    if joined.empty:
        raise Skip(f"{results.NOISE_EVAL_FILE} names no finished trial of this study")
    return joined


def noise_eval_summary(evals: pd.DataFrame, level: float) -> pd.DataFrame:
    """Per variant, lr and run length: the mean test accuracy as trained and mean-scaled, each
    with its Student-t interval at ``level``, and the gain mean-scaled − as trained, its paired
    t interval and its smallest and largest value over the runs.

    Args:
      evals: ``read_noise_eval``.
      level: Coverage of each interval, in (0, 1).

    Returns:
      One row per group (``COLUMNS``), accuracies in percent.
    """
    rows = []
    for (variant, lr, epochs), g in evals.groupby(["variant", "lr", "epochs"], observed=True, sort=True):
        plain, lo, hi = t_interval(g["test_acc"].to_numpy(float), level)
        scaled, s_lo, s_hi = t_interval(g["test_acc_mean_scaled"].to_numpy(float), level)
        gain = paired_difference(dict(zip(g["seed"], g["test_acc_mean_scaled"], strict=True)),
                                 dict(zip(g["seed"], g["test_acc"], strict=True)), level)
        diffs = g["test_acc_mean_scaled"] - g["test_acc"]
        rows.append((variant, lr, epochs, len(g), g["expected_scale"].iloc[0], plain, lo, hi,
                     scaled, s_lo, s_hi, gain["mean"], gain["lo"], gain["hi"], diffs.min(), diffs.max(),
                     level))
    return pd.DataFrame(rows, columns=COLUMNS)


def write_noise_eval_summary(study: Study, opts: Options, report: Report) -> None:
    """noise_eval_summary.csv, and its table on the index page."""
    table = noise_eval_summary(read_noise_eval(study), opts.level)
    table.to_csv(opts.out / "noise_eval_summary.csv", index=False)
    level = f"{opts.level * 100:g}%"
    header = ["variant", "lr", "epochs", "E[s]", "test acc. as trained", "× E[s]",
              "gain (paired)", "gain, min–max", "n"]
    cells = [[str(r.variant), format_number(r.lr), str(r.epochs), f"{r.expected_scale:.3f}",
              f"{r.test_acc:.2f} [{r.test_acc_lo:.2f}, {r.test_acc_hi:.2f}]",
              f"{r.mean_scaled:.2f} [{r.mean_scaled_lo:.2f}, {r.mean_scaled_hi:.2f}]",
              f"{r.gain:.2f} [{r.gain_lo:.2f}, {r.gain_hi:.2f}]", f"{r.gain_min:.2f} to {r.gain_max:.2f}",
              str(r.n)] for r in table.itertuples(index=False)]
    note = (f"Test accuracy in percent of each noisy-BN run's last checkpoint, evaluated as trained "
            f"and with every noisy BN's output multiplied by E[s], the mean of its noise's scale "
            f"(python -m study.noise_eval); mean [{level} Student-t interval] over the n finished "
            f"runs; the gain is paired on the run. Every number: noise_eval_summary.csv.")
    report.tables.append(("Noisy BN evaluated with its noise's mean scale",
                          "\n".join(_md_table(header, cells)) + "\n\n" + note + "\n",
                          ["noise_eval_summary.csv"]))
    print(f"wrote {opts.out / 'noise_eval_summary.csv'}")
