"""Differences between two variants' runs, with the interval of the mean difference.

For a given seed the variants of this study share their initial weights, data order,
augmentation and dropout masks, so runs are paired by seed: the per-seed difference removes
what the seed contributes to both, and its Student-t interval is usually much narrower than
two per-variant intervals side by side. Runs without a partner (a seed one variant lacks)
fall back to Welch's unpaired interval, and every estimate says which it used.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import stats

#: How an estimate was made: per-seed differences, or the two samples unpaired.
PAIRED, WELCH = "paired t", "Welch t"


def paired_difference(
    a: Mapping[int, float], b: Mapping[int, float], confidence_interval_size: float = 0.95
) -> dict[str, float | int | str]:
    """The mean of a − b and its interval, paired on the keys (seeds) where both have a value.

    Args:
      a: One value per seed of the first variant (non-finite values are dropped).
      b: The same for the second variant.
      confidence_interval_size: Coverage of the interval, in (0, 1).

    Returns:
      ``mean`` (mean difference a − b), ``lo``, ``hi`` (interval bounds), ``n`` (pairs, or
      runs of the smaller sample for Welch), ``n_a``, ``n_b`` and ``method``: ``paired t``
      where every finite run has a partner of the same seed, ``Welch t`` otherwise. With
      n = 1 pair lo = hi = mean; with no data every number is NaN and n = 0. Also
      ``welch_lo``, ``welch_hi``: Welch's interval of the same runs taken unpaired, so that
      what pairing buys is (hi − lo) ÷ (welch_hi − welch_lo).
    """
    a = {k: float(v) for k, v in a.items() if np.isfinite(v)}
    b = {k: float(v) for k, v in b.items() if np.isfinite(v)}
    _, welch_lo, welch_hi = welch_interval(np.array(list(a.values())), np.array(list(b.values())),
                                           confidence_interval_size)
    if set(a) == set(b):
        diffs = np.array([a[k] - b[k] for k in sorted(a)])
        mean, lo, hi = _t_interval_of_mean(diffs, confidence_interval_size)
        return dict(mean=mean, lo=lo, hi=hi, n=diffs.size, n_a=len(a), n_b=len(b), method=PAIRED,
                    welch_lo=welch_lo, welch_hi=welch_hi)
    mean, lo, hi = welch_interval(np.array(list(a.values())), np.array(list(b.values())),
                                  confidence_interval_size)
    return dict(mean=mean, lo=lo, hi=hi, n=min(len(a), len(b)), n_a=len(a), n_b=len(b),
                method=WELCH, welch_lo=welch_lo, welch_hi=welch_hi)


def paired_curves(frame: pd.DataFrame, value: str, x: str, reference: str,
                  confidence_interval_size: float = 0.95) -> pd.DataFrame:
    """Each variant's curve minus the ``reference`` variant's, paired by seed at every x.

    Args:
      frame: Long, one row per variant × seed × x: ``variant``, ``seed``, ``x`` and ``value``.
      value: The column compared.
      x: The position column (e.g. ``epoch``).
      reference: The variant subtracted (e.g. ``no BN``); it gets no curve of its own.
      confidence_interval_size: Coverage of the interval, in (0, 1).

    Returns:
      One row per other variant and x where some seed has a finite value for both:
      ``variant``, ``x``, ``mean`` (mean per-seed difference), ``lo``, ``hi`` (its paired
      Student-t interval, ``paired_difference`` over those seeds only; lo = hi = mean where
      n = 1) and ``n`` (the seeds paired).
    """
    data = frame.loc[np.isfinite(frame[value].to_numpy(dtype=float)), ["variant", "seed", x, value]]
    data = data.assign(variant=data["variant"].astype(str))
    base = data[data["variant"] == reference].drop(columns="variant")
    both = data[data["variant"] != reference].merge(base, on=["seed", x], suffixes=("", "_ref"))
    rows = []
    for (variant, at), g in both.groupby(["variant", x], sort=False):
        got = paired_difference(dict(zip(g["seed"], g[value], strict=True)),
                                dict(zip(g["seed"], g[f"{value}_ref"], strict=True)),
                                confidence_interval_size)
        rows.append({"variant": variant, x: at, **{k: got[k] for k in ("mean", "lo", "hi", "n")}})
    return pd.DataFrame(rows, columns=["variant", x, "mean", "lo", "hi", "n"])


def welch_interval(
    a: np.ndarray, b: np.ndarray, confidence_interval_size: float = 0.95
) -> tuple[float, float, float]:
    """Welch's interval of mean(a) − mean(b), unequal variances, Welch–Satterthwaite df.

    Args:
      a: The first sample.
      b: The second sample.
      confidence_interval_size: Coverage of the interval, in (0, 1).

    Returns:
      (difference of the means, lo, hi); NaN bounds where a sample has fewer than 2 values.
    """
    if a.size == 0 or b.size == 0:
        return (np.nan, np.nan, np.nan)
    mean = float(a.mean() - b.mean())
    if a.size < 2 or b.size < 2:
        return (mean, np.nan, np.nan)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = np.sqrt(va + vb)
    if se == 0:
        return (mean, mean, mean)
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = float(stats.t.ppf(0.5 + confidence_interval_size / 2, df) * se)
    return (mean, mean - half, mean + half)


def _t_interval_of_mean(x: np.ndarray, confidence_interval_size: float) -> tuple[float, float, float]:
    if x.size == 0:
        return (np.nan, np.nan, np.nan)
    mean = float(x.mean())
    if x.size == 1:
        return (mean, mean, mean)
    half = float(stats.t.ppf(0.5 + confidence_interval_size / 2, x.size - 1) * x.std(ddof=1)
                 / np.sqrt(x.size))
    return (mean, mean - half, mean + half)
