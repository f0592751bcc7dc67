"""Paired comparisons between variants (``comparisons.md``, ``.csv``, ``.tex``): for every pair
of variants at the same learning rate and run length, the mean per-seed difference A − B of
each quantity of the accuracy and gradient-stability tables, with its interval
(``analysis.paired``: paired Student-t, Welch's where a seed has no partner) and its n.

A variant is one (norm, noise), as the trials table's ``variant`` column labels it; pairs run
in registry order, every later variant against each earlier one (BN − no BN, noisy BN − no
BN, ..., noisy BN − BN, ...). Only finished runs count, and runs of different lengths are
never set side by side: a pair is formed only within one (lr, epochs), and the table names
the pairs that were not compared because their runs differ in length.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.labels import datasets_words, format_number, percent_scale
from analysis.load import Study
from analysis.paired import PAIRED, WELCH, paired_difference
from analysis.report import Options, Report, Skip
from analysis.stability import STABILITY_METRICS
from analysis.tables import (
    _md_table,
    _write_table,
    final_accuracies,
    length_label,
    run_lengths,
    tex_escape,
    window_note,
)

#: Each compared quantity: column -> (table header, decimals), accuracy (percent) first.
METRICS: dict[str, tuple[str, int]] = {
    "train_acc": ("train acc.", 2),
    "val_acc": ("validation acc.", 2),
    "test_acc": ("test acc.", 2),
    **{m: (header, 3) for m, (header, _) in STABILITY_METRICS.items()},
}
#: The long table's columns: one row per pair, lr, run length and metric.
#: ``welch_lo``, ``welch_hi``: the same runs' unpaired (Welch) interval, to show what pairing buys.
COLUMNS = ["pair", "lr", "epochs", "metric", "mean", "lo", "hi", "n", "method", "a", "b", "n_a", "n_b",
           "welch_lo", "welch_hi"]
MINUS = " − "


def run_values(study: Study, stability: tuple[pd.DataFrame, dict[int, int]] | None = None) -> pd.DataFrame:
    """One row per finished run: ``variant``, ``lr``, ``epochs`` (its length), ``seed`` and
    each ``METRICS`` quantity it has: final accuracies in percent, and, where ``stability``
    (``analysis.tables.stability_runs``) is given, its gradient-stability quantities."""
    final = final_accuracies(study)
    accuracy = [m for m in METRICS if m.endswith("_acc")]
    scale = percent_scale(final[accuracy].to_numpy())
    lengths = pd.DataFrame({"trial_id": study.trials["trial_id"].astype(str),
                            "epochs": run_lengths(study.trials).to_numpy()})
    values = final.assign(**{m: final[m] * scale for m in accuracy}).merge(lengths, on="trial_id")
    if stability is not None:
        per_run = stability[0][["trial_id", *STABILITY_METRICS]]
        values = values.merge(per_run, on="trial_id", how="left")
    return values[values["status"] == "done"].reset_index(drop=True)


def comparisons(values: pd.DataFrame, level: float,
                metrics: Sequence[str] = tuple(METRICS)) -> tuple[pd.DataFrame, list[str]]:
    """Every pair of variants at the same (lr, epochs), every metric: the mean difference.

    Args:
      values: ``run_values``: one row per finished run, ``variant`` an ordered categorical
        (registry order), ``lr``, ``epochs``, ``seed`` and a column per compared metric.
      level: Coverage of each interval, in (0, 1).
      metrics: The columns compared, where ``values`` has them (default: ``METRICS``).

    Returns:
      The long table (``COLUMNS``; ``mean``, ``lo``, ``hi``, ``n``, ``n_a``, ``n_b`` and
      ``method`` as ``analysis.paired.paired_difference`` gives them for A − B), in pair
      order, then lr, then length; and the pairs not compared because at some lr their
      runs differ in length, each as words (``noisy BN (noise 1) − BN at lr 0.001 (2 vs 3
      epochs)``).
    """
    metrics = [m for m in metrics if m in values and values[m].notna().any()]
    order = [v for v in values["variant"].cat.categories if v in set(values["variant"])]
    groups = {key: g for key, g in values.groupby(["lr", "epochs"], observed=True, sort=True)}
    rows, refused = [], []
    for i, b in enumerate(order):
        for a in order[i + 1:]:
            pair = f"{a}{MINUS}{b}"
            for lr in sorted(values["lr"].unique()):
                both = [ep for (x, ep), g in groups.items() if x == lr and {a, b} <= set(g["variant"])]
                for ep in both:
                    g = groups[(lr, ep)]
                    runs_a, runs_b = g[g["variant"] == a], g[g["variant"] == b]
                    for metric in metrics:
                        got = paired_difference(dict(zip(runs_a["seed"], runs_a[metric], strict=True)),
                                                dict(zip(runs_b["seed"], runs_b[metric], strict=True)), level)
                        rows.append(dict(pair=pair, lr=lr, epochs=ep, metric=metric, a=a, b=b, **got))
                lengths = [sorted(set(values.loc[(values["lr"] == lr) & (values["variant"] == v), "epochs"]))
                           for v in (a, b)]
                if not both and all(lengths):
                    runs = " vs ".join("/".join(map(length_label, x)) for x in lengths)
                    refused.append(f"{pair} at lr {format_number(lr)} ({runs} epochs)")
    return pd.DataFrame(rows, columns=COLUMNS), refused


def _cell(r, latex: bool) -> str:
    """``mean [lo, hi] (n)``; Welch's gives ``(n_a vs n_b)``; no interval where n = 1."""
    digits = METRICS[r.metric][1]
    if r.n < 1 or not np.isfinite(r.mean):
        return "–"
    f = f".{digits}f"
    n = f"({r.n})" if r.method == PAIRED else f"({r.n_a} vs {r.n_b})"
    mean = f"${r.mean:{f}}$" if latex else f"{r.mean:{f}}"
    if not (np.isfinite(r.lo) and np.isfinite(r.hi)) or (r.method == PAIRED and r.n == 1):
        return f"{mean} {n}"
    return f"{mean} [{r.lo:{f}}, {r.hi:{f}}] {n}"


def _method(methods: pd.Series, headers: dict[str, str]) -> str:
    """The row's method; where its metrics differ, which used Welch's interval."""
    if methods.nunique() == 1:
        return str(methods.iloc[0])
    welch = [headers[m] for m, how in methods.items() if how == WELCH]
    return f"{PAIRED}; {WELCH}: {', '.join(welch)}"


def write_comparisons(long: pd.DataFrame, refused: Sequence[str], study: Study, opts: Options,
                      report: Report, skips: dict[int, int] | None = None) -> None:
    """The comparisons as a long CSV (full precision) and a wide Markdown and LaTeX table:
    one row per pair, lr and length, a ``mean [lo, hi] (n)`` cell per metric."""
    if long.empty:
        why = "no two variants have finished runs at the same learning rate and length"
        raise Skip(why + (f" (not compared, runs of different lengths: {'; '.join(refused)})"
                          if refused else ""))
    long.to_csv(opts.out / "comparisons.csv", index=False)
    metrics = [m for m in METRICS if m in set(long["metric"])]
    headers = {m: METRICS[m][0] for m in metrics}
    level = f"{opts.level * 100:g}%"
    notes = [
        f"Each cell: the mean difference A − B between the two variants' runs [its {level} interval] "
        "(n). Paired t: runs matched on seed (for a given seed the variants share their initial "
        "weights, data order, augmentation and dropout masks), the Student-t interval of the mean "
        "of the n per-seed differences. Welch t: where one variant has a seed (or a value) the "
        "other lacks, Welch's interval of the difference of the two means (unequal variances), "
        "over n_A vs n_B runs. Both are Student-t intervals, whatever --ci; none where n = 1.",
        "Accuracy differences in percentage points at the last epoch (train: the running average "
        "over the last epoch)"
        + (f"; gradient-stability differences of each run's quantity of its global gradient norm "
           f"{window_note(skips)}, as in the gradient-stability table" if skips and any(
               m in STABILITY_METRICS for m in metrics) else "") + ".",
        "Only finished runs (status done). Pairs are formed only between runs of the same learning "
        "rate and length (epochs): runs of different lengths are never set side by side"
        + (f"; not compared for that reason: {'; '.join(refused)}." if refused else "."),
        f"{datasets_words(study.datasets)} Every pair, lr, length and metric, with n_A and "
        "n_B: comparisons.csv (its n: the pairs, or for Welch t the smaller sample; welch_lo and "
        "welch_hi: Welch's interval of the same runs unpaired, what the paired one is narrower than).",
    ]
    header = ["A − B", "lr", "epochs", *headers.values(), "method"]
    def cells(group: pd.DataFrame, tex: bool) -> list[str]:
        """One table row's cells (a pair at one lr and length), for Markdown or LaTeX."""
        first = group.iloc[0]
        by_metric = {r.metric: r for r in group.itertuples(index=False)}
        return [tex_escape(first["pair"]) if tex else first["pair"], format_number(first["lr"]),
                length_label(int(first["epochs"])),
                *(_cell(by_metric[m], tex) if m in by_metric else "–" for m in metrics),
                (tex_escape if tex else str)(_method(group.set_index("metric")["method"], headers))]

    groups = [g for _, g in long.groupby(["pair", "lr", "epochs"], sort=False)]
    md_text = ("\n".join(_md_table(header, [cells(g, False) for g in groups])) + "\n\n"
               + "\n\n".join(notes) + "\n")
    _write_table(opts, report, "comparisons", "Paired comparisons",
                 "Differences between variants, paired by seed, per learning rate and run length",
                 md_text, " & ".join(tex_escape(h) for h in header),
                 [" & ".join(cells(g, True)) for g in groups], tex_escape(" ".join(notes)),
                 "tab:comparisons")
