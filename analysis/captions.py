"""The words every figure's caption shares: how the bands were made and from how many runs,
the learning rate shown, the runs left out, and the dataset; and the settings every title
ends with, so that figures of different runs never share a title."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from analysis import bands
from analysis.labels import SCOPE_WORDS, datasets_words, format_number
from analysis.load import Study
from analysis.report import Options
from analysis.series import OK_STATUSES, at_lr
from analysis.tables import run_lengths
from study import results

#: How a status reads in "Left out: 2 failed runs"; others read as themselves.
_STATUS_WORDS = {"error": "failed"}


def caption(study: Study, opts: Options, est: pd.DataFrame | None, *extra: str) -> str:
    """The bands' method and n (where ``est`` holds the estimates drawn), the non-empty
    ``extra`` sentences, then the dataset."""
    parts = []
    if est is not None:
        label = bands.method_label(opts.method, opts.level, opts.reps)
        parts.append(f"Lines: mean over seeds; bands: {label} ({bands.describe_n(est)}).")
    parts += [e for e in extra if e]
    parts.append(datasets_words(study.datasets))
    return " ".join(parts)


def lr_words(opts: Options) -> str:
    """Which learning rate the figure shows, and how to pick another."""
    text = f"Learning rate {format_number(opts.lr)}"
    if opts.lr_is_default:
        text += " (the smallest in the study; another with --lr)"
    return text + "."


def excluded_words(study: Study, opts: Options, norms: Sequence[str] | None = None) -> str:
    """Say how many trials at the figure's lr (and norms) were left out or are unfinished."""
    trials = at_lr(study.trials, opts.lr)
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


def _listed(values: Sequence[str]) -> str:
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} and {values[-1]}"


def titled(base: str, study: Study, opts: Options, norms: Sequence[str] | None = None,
           one_lr: bool = True) -> str:
    """``base (lr 0.001, 10 epochs, noise 1 per layer)``: a figure's title with the settings of
    the runs it draws (those at ``opts.lr`` unless not ``one_lr``, of ``norms`` where given),
    so that the same figure of another lr, run length or noise never shares its title."""
    trials = at_lr(study.trials, opts.lr) if one_lr else study.trials
    if norms is not None:
        trials = trials[trials["norm"].isin(norms)]
    lrs = [opts.lr] if one_lr else sorted(trials["lr"].dropna().unique())
    words = [f"lr {_listed([format_number(x) for x in lrs])}"] if lrs else []
    lengths = sorted({int(x) for x in run_lengths(trials) if x > 0})
    if lengths:
        words.append(f"{_listed([str(x) for x in lengths])} epoch{'s' if lengths != [1] else ''}")
    noisy = trials[trials["norm"].isin(results.NOISY_NORMS)]
    if not noisy.empty:
        noises = [format_number(x) for x in sorted(noisy["noise"].unique())]
        scopes = sorted(noisy["noise_scope"].dropna().unique()) if "noise_scope" in noisy else []
        where = f" {_listed([SCOPE_WORDS.get(str(x), str(x)) for x in scopes])}" if scopes else ""
        words.append(f"noise {_listed(noises)}{where}")
    return f"{base} ({', '.join(words)})" if words else base
