"""The study's tables: final accuracy, and gradient stability (``analysis.stability``), per
variant and learning rate, as mean and interval across seeds; each written as CSV (full
precision), Markdown and LaTeX and listed on the index page."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis import bands
from analysis.labels import datasets_words, format_number, percent_scale
from analysis.load import Study
from analysis.report import Options, Report, Skip
from analysis.stability import STABILITY_METRICS, stability_frame, stability_row
from study import results


def final_accuracies(study: Study) -> pd.DataFrame:
    """One row per trial: train, validation and test accuracy at its last recorded epoch.

    Train accuracy is the running average over the last epoch (the seed's measure).
    """
    trials = study.trials[["trial_id", "variant", "norm", "noise", "lr", "seed", "status"]]
    ep = study.epochs
    if ep.empty:
        last = pd.DataFrame(columns=["trial_id", "epoch", "train_acc", "val_acc", "test_acc"])
    else:
        ep = ep.sort_values(["trial_id", "epoch"])
        last = ep.groupby("trial_id", observed=True).tail(1)
        last = last[["trial_id", "epoch", "train_acc", "val_acc", "test_acc"]].assign(
            trial_id=lambda d: d["trial_id"].astype(str)
        )
    return trials.merge(last, on="trial_id", how="left")


def accuracy_table(study: Study, opts: Options) -> pd.DataFrame:
    """Variant × lr: final accuracies (percent) as mean, interval and half-width over done runs."""
    final = final_accuracies(study)
    scale = percent_scale(final[["train_acc", "val_acc", "test_acc"]].to_numpy())
    done = final[final["status"] == "done"]
    keys = ["variant", "lr"]
    rows = final.groupby(keys, observed=True, sort=True).agg(
        norm=("norm", "first"), noise=("noise", "first"), trials=("trial_id", "size")
    )
    for status in ("done", "diverged", "error", "running"):
        rows[status] = (
            final[final["status"] == status]
            .groupby(keys, observed=True)
            .size()
            .reindex(rows.index)
            .fillna(0)
            .astype(int)
        )
    rows = rows.rename(columns={"done": "n"})
    metrics = ("train", "val", "test")
    _add_intervals(rows, done.assign(**{m: done[f"{m}_acc"] * scale for m in metrics}), keys, metrics, opts)
    for metric in metrics:
        rows[f"{metric}_hw"] = (rows[f"{metric}_hi"] - rows[f"{metric}_lo"]) / 2
    out = rows.reset_index()
    out["variant"] = out["variant"].astype(str)
    first = ["variant", "norm", "noise", "lr", "trials"]
    return out[first + [c for c in out.columns if c not in first]]


def _add_intervals(rows: pd.DataFrame, runs: pd.DataFrame, keys: list[str], columns: Sequence[str],
                   opts: Options) -> None:
    """``rows`` (indexed by ``keys``) gain ``<column>_mean``, ``_lo``, ``_hi`` and ``_n``: each
    column's mean over the ``runs`` with a finite value per key, its interval (``--ci``,
    ``--level``) and how many runs it is over."""
    for column in columns:
        est = opts.estimate(runs.assign(x=0), keys, "x", column).set_index(keys)
        for part in ("mean", "lo", "hi"):
            rows[f"{column}_{part}"] = est[part].reindex(rows.index)
        rows[f"{column}_n"] = est["n"].reindex(rows.index).fillna(0).astype(int)


def _interval_note(opts: Options) -> str:
    """What a table's cells are: the mean over finished runs and its interval."""
    return (f"{'Mean ± half-width' if opts.method == 't' else 'Mean [interval]'} of the "
            f"{bands.method_label(opts.method, opts.level, opts.reps)} over the n runs that finished "
            "(status done)")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table's lines (pipes inside cells escaped)."""
    line = lambda cells: "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"  # noqa: E731
    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]


def _write_table(opts: Options, report: Report, stem: str, heading: str, title: str, md_text: str,
                 tex_header: str, tex_rows: Sequence[str], caption: str, label: str,
                 extra_files: Sequence[str] = ()) -> None:
    """``stem``.md and ``stem``.tex (the CSV is written by the caller); the index page shows the
    Markdown under ``heading``."""
    (opts.out / f"{stem}.md").write_text(f"# {title}\n\n{md_text}")
    n_cols = tex_header.count(" & ") + 1
    tex = [f"% {title} (written by analysis.figures)", "\\begin{table}[t]", "\\centering",
           "\\begin{tabular}{ll" + "r" * (n_cols - 2) + "}", "\\hline", tex_header + " \\\\", "\\hline",
           *(row + " \\\\" for row in tex_rows), "\\hline", "\\end{tabular}", "\\caption{" + caption + "}",
           f"\\label{{{label}}}", "\\end{table}"]
    (opts.out / f"{stem}.tex").write_text("\n".join(tex) + "\n")
    report.tables.append((heading, md_text, [f"{stem}.md", f"{stem}.csv", f"{stem}.tex", *extra_files]))
    print(f"wrote {opts.out / stem}.md, .csv, .tex" + "".join(f", {f}" for f in extra_files))


def _cell(mean: float, lo: float, hi: float, n: int, of: int, latex: bool, symmetric: bool,
          digits: int = 2) -> str:
    """``mean ± half-width`` for a symmetric interval (Student-t), ``mean [lo, hi]`` for one
    that need not be (the percentile bootstrap); over ``n`` runs, said where the row has ``of``
    more (runs without a finite value)."""
    f = f".{digits}f"
    if not np.isfinite(mean) or n < 1:
        return "–"
    fewer = "" if n >= of else f" (n={n})"
    if n == 1 or not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{mean:{f}}{fewer}"
    if symmetric:
        hw = (hi - lo) / 2
        return (f"${mean:{f}} \\pm {hw:{f}}${fewer}" if latex else f"{mean:{f}} ± {hw:{f}}{fewer}")
    return (f"${mean:{f}}$ [{lo:{f}}, {hi:{f}}]{fewer}" if latex
            else f"{mean:{f}} [{lo:{f}}, {hi:{f}}]{fewer}")


def write_accuracy_table(table: pd.DataFrame, study: Study, opts: Options, report: Report) -> None:
    """The accuracy table as CSV (full precision), Markdown and LaTeX."""
    metrics = (("train", "train"), ("val", "validation"), ("test", "test"))
    csv_path = opts.out / "accuracy_table.csv"
    table.to_csv(csv_path, index=False)
    notes = [
        "Accuracy in percent at the last epoch; train accuracy is the running average over the "
        "last epoch (the seed's measure).",
        _interval_note(opts) + "; no interval where n = 1, and a cell over fewer runs (a value "
        "missing) gives its own n.",
        "Diverged runs (a non-finite loss) are counted in the 'diverged' column and excluded "
        "from the means; so are failed ('error') and still running runs.",
        datasets_words(study.datasets),
    ]
    header = ["variant", "lr", *(f"{w} acc." for _, w in metrics), "n", "diverged¹", "error", "running"]

    def cells(r, tex: bool) -> list[str]:
        """One table row's cells, for Markdown or LaTeX."""
        return [tex_escape(r.variant) if tex else r.variant, format_number(r.lr),
                *(_cell(getattr(r, f"{m}_mean"), getattr(r, f"{m}_lo"), getattr(r, f"{m}_hi"),
                        getattr(r, f"{m}_n"), r.n, tex, symmetric=opts.method == "t")
                  for m, _ in metrics),
                *(str(v) for v in (r.n, r.diverged, r.error, r.running))]

    rows = list(table.itertuples(index=False))
    md_text = (
        "\n".join(_md_table(header, [cells(r, False) for r in rows]))
        + "\n\n"
        + "\n\n".join(f"{'¹ ' if i == 2 else ''}{note}" for i, note in enumerate(notes))
        + "\n"
    )
    _write_table(
        opts, report, "accuracy_table", "Accuracy", "Final accuracy per variant and learning rate", md_text,
        "variant & lr & train acc. & validation acc. & test acc. & $n$ & diverged$^{a}$ & error & running",
        [" & ".join(cells(r, True)) for r in rows],
        tex_escape(" ".join(notes[:2])) + " $^{a}$" + tex_escape(notes[2]) + " " + tex_escape(notes[3]),
        "tab:accuracy",
    )


def run_lengths(trials: pd.DataFrame) -> pd.Series:
    """Each trial's length as planned, in epochs (0 where the trials table lacks it)."""
    return pd.to_numeric(trials["epochs"], errors="coerce").fillna(0).astype(int)


def length_label(length: int) -> str:
    """A run length for a table cell: its epochs, ``–`` where unrecorded."""
    return str(length) if length > 0 else "–"


def skipped_epochs(length: int) -> int:
    """The epochs left out of a run's gradient-stability window: its first, where the norm
    settles, unless that is all the run has."""
    return 1 if length >= 2 else 0


def stability_runs(study: Study) -> tuple[pd.DataFrame, dict[int, int]]:
    """One row per run with steps: its trial columns, length (``epochs``) and
    ``analysis.stability.gradient_stability`` over its window, the steps after its first
    epoch (``skipped_epochs``); returns the rows and the epochs skipped per run length."""
    if study.steps.empty:
        raise Skip("no run has per-step gradient norms")
    layers = tuple(name for name in results.GRAD_LAYERS if f"grad_norm_{name}" in study.steps)
    trials = study.trials[["trial_id", "variant", "norm", "noise", "lr", "seed", "status"]]
    trials = trials.assign(trial_id=trials["trial_id"].astype(str), epochs=run_lengths(study.trials))
    trials = trials[["trial_id", "variant", "norm", "noise", "lr", "epochs", "seed", "status"]]
    lengths = sorted(int(x) for x in trials["epochs"].unique())
    skips = {length: skipped_epochs(length) for length in lengths}
    length_of = {t: int(n) for t, n in zip(trials["trial_id"], trials["epochs"], strict=True)}
    rows: dict[int, list[dict]] = {length: [] for length in lengths}
    # one trial's steps at a time: a large study's steps table does not fit in memory
    for run in study.steps.frames(columns=["grad_norm", *(f"grad_norm_{name}" for name in layers)]):
        length = length_of[str(run["trial_id"].iloc[0])]
        rows[length].append(stability_row(run, skips[length], layers))
    parts = [stability_frame(rows[length], layers) for length in lengths]
    return trials.merge(pd.concat(parts, ignore_index=True), on="trial_id"), skips


def stability_table(study: Study, opts: Options,
                    runs: tuple[pd.DataFrame, dict[int, int]] | None = None
                    ) -> tuple[pd.DataFrame, dict[int, int]]:
    """Variant × lr × run length: each ``STABILITY_METRICS`` quantity of the done runs' global
    gradient norm (mean and interval over runs) over their windows (``stability_runs``, or
    ``runs`` where already computed); runs of different lengths are never pooled. Writes
    gradient_stability_runs.csv; returns the table and the epochs skipped per run length."""
    per_run, skips = runs if runs is not None else stability_runs(study)
    per_run.to_csv(opts.out / "gradient_stability_runs.csv", index=False)
    done = per_run[per_run["status"] == "done"]
    if done.empty:
        raise Skip("no finished run has per-step gradient norms")
    keys = ["variant", "lr", "epochs"]
    rows = done.groupby(keys, observed=True, sort=True).agg(
        norm=("norm", "first"), noise=("noise", "first"), n=("trial_id", "size"))
    _add_intervals(rows, done, keys, list(STABILITY_METRICS), opts)
    out = rows.reset_index()
    out["variant"] = out["variant"].astype(str)
    return out, {int(length): skips[int(length)] for length in sorted(out["epochs"].unique())}


def window_note(skips: dict[int, int]) -> str:
    """Words for the steps a gradient-stability quantity is over, per run length."""
    def one(length: int, skip: int) -> str:
        if length < 1:
            return "every epoch of runs of unrecorded length"
        epochs = f"epoch {skip + 1}" if skip + 1 == length else f"epochs {skip + 1}–{length}"
        return f"{epochs} of {length}-epoch runs"

    past = "after the first epoch, where the norm settles" if any(skips.values()) else "in every epoch"
    return f"{past} (the window: " + ", ".join(one(n, skip) for n, skip in sorted(skips.items())) + ")"


def write_stability_table(table: pd.DataFrame, skips: dict[int, int], study: Study, opts: Options,
                          report: Report) -> None:
    """The gradient-stability table as CSV (full precision), Markdown and LaTeX."""
    table.to_csv(opts.out / "gradient_stability.csv", index=False)
    lengths = sorted(skips)
    notes = [
        f"Per run, over its global gradient ℓ2 norm ‖g‖ at each recorded step {window_note(skips)}: "
        + "; ".join(f"{h}: {what}" for h, what in STABILITY_METRICS.values()) + ".",
        "Runs of different lengths are never pooled (each row is over runs of one length, its "
        "epochs): CV and max ÷ median grow with the window's length"
        + (f", so compare rows of the same length only (this study's runs are of "
           f"{', '.join(length_label(x) for x in lengths[:-1])} and {length_label(lengths[-1])} epochs)."
           if len(lengths) > 1 else "."),
        f"{_interval_note(opts)}. {datasets_words(study.datasets)}",
        "Each run's values and its number of steps in the window, for each layer's norm too: "
        "gradient_stability_runs.csv.",
    ]
    header = ["variant", "lr", "epochs", *(h for h, _ in STABILITY_METRICS.values()), "n"]

    def cells(r, tex: bool) -> list[str]:
        return [tex_escape(r.variant) if tex else r.variant, format_number(r.lr),
                length_label(r.epochs),
                *(_cell(getattr(r, f"{m}_mean"), getattr(r, f"{m}_lo"), getattr(r, f"{m}_hi"),
                        getattr(r, f"{m}_n"), r.n, tex, symmetric=opts.method == "t", digits=3)
                  for m in STABILITY_METRICS),
                str(r.n)]

    rows = list(table.itertuples(index=False))
    md_lines = _md_table(header, [cells(r, False) for r in rows])
    md_text = "\n".join(md_lines) + "\n\n" + "\n\n".join(notes) + "\n"
    _write_table(opts, report, "gradient_stability", "Gradient stability",
                 "Gradient stability per variant, learning rate and run length", md_text,
                 " & ".join(tex_escape(h) for h in header), [" & ".join(cells(r, True)) for r in rows],
                 tex_escape(" ".join(notes)), "tab:gradient-stability", ["gradient_stability_runs.csv"])


#: LaTeX's special characters, and the typographic and math ones the tables use, in text mode,
#: replaced in one pass.
_TEX_SPECIAL = {
    "\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "_": "\\_", "#": "\\#", "$": "\\$",
    "{": "\\{", "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}",
    "±": "$\\pm$", "–": "--", "|": "$|$", "‖": "$\\|$", "Δ": "$\\Delta$", "÷": "$\\div$",
    "ℓ": "$\\ell$", "−": "$-$",
}


def tex_escape(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in text)
