"""The words every figure's caption shares: how the bands were made and from how many runs,
the learning rate shown, the runs left out, and the dataset."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from analysis import bands
from analysis.labels import format_number
from analysis.load import Study
from analysis.report import Options
from analysis.series import OK_STATUSES, at_lr

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
    parts.append(f"Dataset: {', '.join(study.datasets)}.")
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
