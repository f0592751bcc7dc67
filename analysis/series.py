"""The rows a figure draws and the series it makes of them: rows at one learning rate and of
runs that can be drawn, trailing moving averages, step bins and histogram densities."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

#: Status values whose curves are drawn; diverged and failed runs are counted, not averaged.
OK_STATUSES: tuple[str, ...] = ("done", "running")
#: Most x positions a curve is drawn at; longer series are averaged into this many bins first.
MAX_POINTS = 500


def at_lr(frame: pd.DataFrame, lr: float) -> pd.DataFrame:
    """The rows of runs at learning rate ``lr``."""
    return frame[np.isclose(frame["lr"].to_numpy(dtype=float), lr, rtol=1e-9, atol=0)]


def drawable(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of runs whose curves are drawn (``OK_STATUSES``)."""
    return frame[frame["status"].isin(OK_STATUSES)]


def variants_in(frame: pd.DataFrame) -> list[str]:
    """The variants ``frame`` holds rows of, in display order."""
    present = set(frame["variant"].astype(str).unique())
    return [v for v in frame["variant"].cat.categories if v in present]


def moving_average(values: np.ndarray, group_start: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Trailing mean over the last ``window`` rows of each row's group, skipping non-finite values.

    Rows are sorted by group; ``group_start[i]`` is the first row of row i's group. Cumulative
    sums make it one pass over millions of rows.
    """
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    csum = np.concatenate([[0.0], np.cumsum(np.where(finite, v, 0.0))])
    ccount = np.concatenate([[0], np.cumsum(finite)])
    i = np.arange(len(v))
    start = np.maximum(group_start, i - window + 1)
    total, count = csum[i + 1] - csum[start], ccount[i + 1] - ccount[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def smoothed_step_curves(
    steps: pd.DataFrame,
    columns: Sequence[str],
    smooth: int,
    grad_every: pd.Series | None = None,
    max_points: int = MAX_POINTS,
) -> pd.DataFrame:
    """Per trial: moving average over ``smooth`` training steps, then averaged into ≤ max_points
    step bins, so that bands across seeds are computed at few positions. One row per (trial, bin)
    with ``step`` (mean step of the bin), the trial columns and the smoothed ``columns``.
    """
    codes = steps["trial_id"].cat.codes.to_numpy()
    step = steps["step"].to_numpy()
    order = np.lexsort((step, codes))
    codes, step = codes[order], step[order]
    n = len(codes)
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = codes[1:] != codes[:-1]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    every = np.ones(len(steps["trial_id"].cat.categories))
    if grad_every is not None:
        every = (
            grad_every.reindex(steps["trial_id"].cat.categories).fillna(1).clip(lower=1).to_numpy()
        )
    window = np.maximum(1, np.round(smooth / every[codes])).astype(np.int64)
    lo, hi = int(step.min()), int(step.max())
    nbins = int(min(max_points, len(np.unique(step))))
    bins = np.minimum((step - lo) * nbins // max(hi - lo + 1, 1), nbins - 1)
    data = {"code": codes, "bin": bins, "step": step.astype(np.float64)}
    for col in columns:
        data[col] = moving_average(steps[col].to_numpy()[order], group_start, window)
    binned = pd.DataFrame(data).groupby(["code", "bin"], sort=False).mean().reset_index()
    bin_step = pd.Series(step.astype(np.float64)).groupby(bins).mean()
    binned["step"] = bin_step.reindex(binned["bin"]).to_numpy()
    first = np.flatnonzero(new_group)
    lookup = steps.iloc[order[first]].set_index(pd.Index(codes[first]))
    for col in ("trial_id", "variant", "seed", "lr", "status"):
        values = lookup[col].reindex(binned["code"])
        binned[col] = (
            values.to_numpy()
            if col != "variant"
            else pd.Categorical(values.astype(str), dtype=steps["variant"].dtype)
        )
    return binned.drop(columns="code")


def bin_steps(frame: pd.DataFrame, max_points: int = MAX_POINTS) -> pd.DataFrame:
    """Replace ``step`` by the mean step of ≤ max_points equal bins when there are more steps."""
    steps = frame["step"].to_numpy()
    unique = np.unique(steps)
    if len(unique) <= max_points:
        return frame
    lo, hi = int(unique[0]), int(unique[-1])
    bins = np.minimum((steps - lo) * max_points // (hi - lo + 1), max_points - 1)
    centers = pd.Series(steps.astype(float)).groupby(bins).mean()
    return frame.assign(step=centers.reindex(bins).to_numpy())


def histogram_densities(layers: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Densities of every row's histogram on one common bin grid: (edges, densities[row, bin]).

    Rows whose bins differ are re-binned through their cumulative counts, so seeds can be
    averaged even if a run changed its histogram range. A row's outer bins also hold the values
    clamped into them (tails, not density): they go to the common grid's outer bins.
    """
    lo, hi = layers["hist_lo"].to_numpy(float), layers["hist_hi"].to_numpy(float)
    lengths = layers["hist"].map(len).to_numpy()
    nb = int(lengths.max())
    edges = np.linspace(lo.min(), hi.max(), nb + 1)
    width = np.diff(edges)
    if (lo == lo[0]).all() and (hi == hi[0]).all() and (lengths == nb).all():
        counts = np.stack(layers["hist"].to_numpy()).astype(float)
    else:
        counts = np.zeros((len(layers), nb))
        for i, (h, a, b) in enumerate(zip(layers["hist"], lo, hi, strict=True)):
            h = np.asarray(h, dtype=float)
            own = np.linspace(a, b, len(h) + 1)
            cdf = np.concatenate([[0.0], np.cumsum(h[1:-1])])
            counts[i] = np.diff(np.interp(edges, own[1:-1], cdf))
            counts[i, 0] += h[0]
            counts[i, -1] += h[-1] if len(h) > 1 else 0.0
    total = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return edges, np.where(total > 0, counts / total / width, np.nan)
