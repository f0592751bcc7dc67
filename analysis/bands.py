"""Confidence intervals across seeds, for every group and x position of a figure at once.

Names follow google-research's rliable (``get_interval_estimates``, ``point_estimates``,
``interval_estimates``, ``confidence_interval_size``, ``reps``, ``random_state``), but the
input is a long DataFrame (one row per group × x × seed) so that a figure's bands come from
one vectorised groupby instead of a loop over positions.

With a handful of seeds the default is the Student-t interval of the mean; the percentile
bootstrap (``scipy.stats.bootstrap``) is the option that assumes no normality but is too
narrow for very few seeds. With one seed there is no interval: the band collapses onto the
mean (``lo == hi == mean``, never NaN), and :func:`describe_n` says so in the caption.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

#: ``t``: Student-t interval of the mean; ``bootstrap``: percentile bootstrap of the mean.
METHODS: tuple[str, ...] = ("t", "bootstrap")
ESTIMATE_COLUMNS: tuple[str, ...] = ("mean", "lo", "hi", "n")


def t_interval(
    scores: Sequence[float] | np.ndarray, confidence_interval_size: float = 0.95
) -> tuple[float, float, float]:
    """(mean, lo, hi) of one sample: the Student-t interval of its mean; lo = hi = mean if n = 1."""
    x = np.asarray(scores, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return (np.nan, np.nan, np.nan)
    mean = float(x.mean())
    if x.size == 1:
        return (mean, mean, mean)
    half = _t_half_width(np.array([x.std(ddof=1)]), np.array([x.size]), confidence_interval_size)
    return (mean, mean - float(half[0]), mean + float(half[0]))


def get_interval_estimates(
    frame: pd.DataFrame,
    by: Sequence[str],
    x: str,
    value: str = "value",
    *,
    method: str = "t",
    confidence_interval_size: float = 0.95,
    reps: int = 2000,
    random_state: int | None = 0,
) -> pd.DataFrame:
    """Point and interval estimates of the mean of ``value`` over the rows (seeds) of each group.

    ``frame`` is long: one row per seed at each (``by``..., ``x``). Returns one row per
    (``by``..., ``x``) with ``mean`` (point estimate), ``lo`` and ``hi`` (interval estimate)
    and ``n`` (finite values used). Non-finite values are dropped; groups left with none are
    omitted; groups with n = 1 get lo = hi = mean.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if not 0 < confidence_interval_size < 1:
        raise ValueError(
            f"confidence_interval_size must be in (0, 1), not {confidence_interval_size}"
        )
    keys = [*by, x]
    values = frame[value].to_numpy(dtype=float)
    data = frame.loc[np.isfinite(values), keys].copy()
    data["_v"] = values[np.isfinite(values)]
    if data.empty:
        return pd.DataFrame(columns=[*keys, *ESTIMATE_COLUMNS])
    grouped = data.groupby(keys, sort=True, observed=True)["_v"]
    out = grouped.agg(mean="mean", sd="std", n="count").reset_index()
    mean = out["mean"].to_numpy(dtype=float)
    n = out["n"].to_numpy()
    if method == "t":
        sd = np.nan_to_num(out["sd"].to_numpy(dtype=float))
        half = _t_half_width(sd, n, confidence_interval_size)
        lo, hi = mean - half, mean + half
    else:
        gid = grouped.ngroup().to_numpy()
        lo, hi = _bootstrap_bounds(
            data["_v"].to_numpy(), gid, mean, n, confidence_interval_size, reps, random_state
        )
    out["lo"], out["hi"] = lo, hi
    out["n"] = n.astype(int)
    return out[[*keys, *ESTIMATE_COLUMNS]]


def _t_half_width(sd: np.ndarray, n: np.ndarray, size: float) -> np.ndarray:
    half = np.zeros(len(n), dtype=float)
    many = n > 1
    if many.any():
        q = stats.t.ppf(0.5 + size / 2, n[many] - 1)
        half[many] = q * sd[many] / np.sqrt(n[many])
    return half


def _bootstrap_bounds(
    values: np.ndarray,
    gid: np.ndarray,
    mean: np.ndarray,
    n: np.ndarray,
    size: float,
    reps: int,
    random_state: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap per group, vectorised over all groups with the same n."""
    rng = np.random.default_rng(random_state)
    order = np.argsort(gid, kind="stable")
    starts = np.concatenate([[0], np.cumsum(n)[:-1]])
    lo, hi = mean.copy(), mean.copy()
    sorted_values = values[order]
    for size_n in np.unique(n[n > 1]):
        groups = np.flatnonzero(n == size_n)
        idx = starts[groups][:, None] + np.arange(size_n)[None, :]
        sample = sorted_values[idx]
        batch = int(max(1, min(reps, 2e7 // max(sample.size, 1))))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.bootstrap(
                (sample,),
                np.mean,
                n_resamples=reps,
                batch=batch,
                vectorized=True,
                axis=-1,
                confidence_level=size,
                method="percentile",
                rng=rng,
            )
        g_lo = np.asarray(res.confidence_interval.low, dtype=float)
        g_hi = np.asarray(res.confidence_interval.high, dtype=float)
        # Constant samples give a degenerate bootstrap distribution: the band is the mean.
        lo[groups] = np.where(np.isfinite(g_lo), g_lo, mean[groups])
        hi[groups] = np.where(np.isfinite(g_hi), g_hi, mean[groups])
    return lo, hi


def method_label(method: str, confidence_interval_size: float, reps: int = 2000) -> str:
    """Words for a caption, e.g. ``95% Student-t interval of the mean``."""
    level = f"{confidence_interval_size * 100:g}%"
    if method == "t":
        return f"{level} Student-t interval of the mean"
    return f"{level} percentile bootstrap interval of the mean ({reps:,} resamples)"


def describe_n(
    estimates: pd.DataFrame | Sequence[int],
    unit: str = "seeds",
    per: str = "point",
    band: bool = True,
) -> str:
    """``n = 5 seeds`` or ``n = 1–5 seeds per point; no band where n = 1`` for a caption."""
    n = estimates["n"] if isinstance(estimates, pd.DataFrame) else pd.Series(list(estimates))
    n = n.dropna().astype(int)
    if n.empty:
        return f"n = 0 {unit}"
    lo, hi = int(n.min()), int(n.max())
    if hi == 1 and unit.endswith("s"):
        unit = unit[:-1]
    text = f"n = {lo} {unit}" if lo == hi else f"n = {lo}–{hi} {unit} per {per}"
    if lo == 1 and band:
        text += "; no band where n = 1"
    return text
