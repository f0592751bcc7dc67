"""The rows a figure draws and the series it makes of them: rows at one learning rate and of
runs that can be drawn, trailing moving averages, step bins and histogram densities."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

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


def smoothed_step_curves(
    steps: pd.DataFrame | Callable[[Sequence[str]], Iterable[pd.DataFrame]],
    columns: Sequence[str],
    smooth: int,
    grad_every: pd.Series | None = None,
    max_points: int = MAX_POINTS,
    present: dict[str, bool] | None = None,
) -> pd.DataFrame:
    """Per trial: moving average over ``smooth`` training steps, then averaged into ≤ max_points
    step bins, so that bands across seeds are computed at few positions. One row per (trial, bin)
    with ``step`` (mean step of the bin), the trial columns and the smoothed ``columns``.

    ``steps``: every trial's rows, or a function giving each trial's rows of the steps columns
    it is passed (one DataFrame a trial, in the same order every call), so that a study too large
    to hold is read a trial at a time: twice, the first time its ``step`` column only (the bins
    are shared by all trials). ``present`` gets, per column, whether any row has a value.
    """
    trials = steps if callable(steps) else _trial_frames(steps)
    distinct: dict[bytes, np.ndarray] = {}  # each distinct set of a trial's steps (most trials share one)
    for part in trials(()):
        steps_here = np.unique(part["step"].to_numpy()).astype(np.int64)
        distinct.setdefault(steps_here.tobytes(), steps_here)
    unique = np.unique(np.concatenate([np.empty(0, dtype=np.int64), *distinct.values()]))
    lo, hi = int(unique[0]), int(unique[-1])
    nbins = int(min(max_points, len(unique)))
    bin_sum, bin_n = np.zeros(nbins), np.zeros(nbins, dtype=np.int64)
    # each column's running sum continues over the trials before, as when one cumulative sum ran
    # over every trial at once: the curves stay the same to the last bit
    carry = dict.fromkeys(columns, 0.0)
    seen = dict.fromkeys(columns, False)
    parts = []
    for part in trials(columns):
        order = np.argsort(part["step"].to_numpy(), kind="stable")
        step = part["step"].to_numpy()[order]
        every = np.ones(1)
        if grad_every is not None:
            tid = str(part["trial_id"].iloc[0])
            every = grad_every.reindex([tid]).fillna(1).clip(lower=1).to_numpy()
        window = int(np.maximum(1, np.round(smooth / every)).astype(np.int64)[0])
        bins = np.minimum((step - lo) * nbins // max(hi - lo + 1, 1), nbins - 1)
        data = {"bin": bins, "step": step.astype(np.float64)}
        for col in columns:
            values = part[col].to_numpy()[order]
            seen[col] |= bool(part[col].notna().any())
            data[col], carry[col] = trailing_mean(values, window, carry[col])
        binned = pd.DataFrame(data).groupby("bin", sort=False).mean().reset_index()
        bin_sum += np.bincount(bins, weights=step.astype(np.float64), minlength=nbins)
        bin_n += np.bincount(bins, minlength=nbins)
        first = part.iloc[order[:1]]
        for col in ("trial_id", "variant", "seed", "lr", "status"):
            value = first[col].astype(str) if col == "variant" else first[col]
            binned[col] = np.repeat(value.to_numpy(), len(binned))
        binned["variant"] = pd.Categorical(binned["variant"], dtype=part["variant"].dtype)
        parts.append(binned)
    out = pd.concat(parts, ignore_index=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["step"] = (bin_sum / bin_n)[out["bin"].to_numpy()]
    if present is not None:
        present.update(seen)
    return out


def _trial_frames(steps: pd.DataFrame) -> Callable[[Sequence[str]], Iterator[pd.DataFrame]]:
    """``steps``' rows per trial, in the order of its ``trial_id`` categories."""
    def frames(columns: Sequence[str]) -> Iterator[pd.DataFrame]:
        for _, part in steps.groupby("trial_id", observed=True, sort=True):
            yield part
    return frames


def trailing_mean(values: np.ndarray, window: int, carry: float) -> tuple[np.ndarray, float]:
    """Trailing mean over the last ``window`` of one trial's ``values``, skipping non-finite
    ones, from cumulative sums (one pass over a long run) that start at ``carry`` (the sum of
    the trials before); returns it and the sum to carry on."""
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    csum = np.cumsum(np.concatenate([[carry], np.where(finite, v, 0.0)]))
    ccount = np.concatenate([[0], np.cumsum(finite)])
    i = np.arange(len(v))
    start = np.maximum(0, i - window + 1)
    total, count = csum[i + 1] - csum[start], ccount[i + 1] - ccount[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan), float(csum[-1])


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
