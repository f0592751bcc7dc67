"""Drawing on one panel (a matplotlib axes): mean lines with their bands across seeds, a log
axis labelled with plain numbers, whole-number epoch ticks."""

from __future__ import annotations

import matplotlib.ticker
import numpy as np
import pandas as pd

from analysis.style import VariantStyle


def draw_bands(
    ax,
    est: pd.DataFrame,
    styles: dict[str, VariantStyle],
    x: str,
    markers: bool,
    log: bool = False,
    clip: tuple[float, float] | None = None,
) -> None:
    """Mean lines with their bands, one per variant (no band where n = 1).

    With ``log``, the axis is logarithmic and band edges below half the smallest mean (those at
    or below zero of a wide t-interval of a positive quantity, and any lower) are drawn there,
    so that one wide band does not squeeze the others' decades. ``clip`` limits the bands
    to the range the quantity can take (e.g. a cosine's [-1, 1]).
    """
    if clip is not None:
        est = est.assign(lo=est["lo"].clip(*clip), hi=est["hi"].clip(*clip))
    means = est["mean"].to_numpy(dtype=float)
    if log and (means > 0).any():
        floor = 0.5 * means[means > 0].min()
        est = est.assign(lo=est["lo"].where(est["lo"] > floor, floor))
        plain_log(ax, floor, float(est["hi"].max()))
    positions = np.unique(est[x].to_numpy(dtype=float))
    if len(positions) == 1:  # one tick at it, not a tiny range of fractional ones
        ax.set_xlim(positions[0] - 1, positions[0] + 1)
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(positions))
    groups = list(est.groupby("variant", observed=True, sort=True))
    for i, (variant, g) in enumerate(groups):
        st = styles[str(variant)]
        g = g.sort_values(x)
        xs = g[x].to_numpy(dtype=float)
        if len(positions) == 1:  # side by side, so that the error bars do not hide each other
            xs = xs + 0.12 * (i - (len(groups) - 1) / 2)
        ax.plot(
            xs,
            g["mean"],
            color=st.color,
            ls=st.linestyle,
            lw=1.6,
            marker=st.marker if markers else None,
            ms=4,
            label=str(variant),  # the line's key; the legend shows st.label
        )
        has_band = g["n"].to_numpy() > 1
        if len(xs) == 1 and has_band[0]:  # one position (a one-epoch study): no area to fill
            m, lo, hi = (float(g[c].iloc[0]) for c in ("mean", "lo", "hi"))
            ax.errorbar(xs, [m], yerr=[[m - lo], [hi - m]], color=st.color, capsize=4, lw=1.2)
        elif has_band.any():
            ax.fill_between(
                xs,
                g["lo"],
                g["hi"],
                where=has_band,
                color=st.color,
                alpha=0.18,
                lw=0,
                interpolate=False,
            )


def plain_log(ax, lo: float, hi: float) -> None:
    """Log y axis labelled with plain numbers, more of them per decade when the range is narrow."""
    ax.set_yscale("log")
    ticker = matplotlib.ticker
    ratio = hi / lo if np.isfinite(hi) else np.inf
    if ratio < 10:  # less than a decade: evenly spaced values read better than 1, 2, 5
        ax.yaxis.set_major_locator(ticker.MaxNLocator(nbins=5))
    else:
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0) if ratio < 1e3 else (1.0,)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def integer_ticks(ax) -> None:
    """Epochs are whole numbers; a single one keeps the tick ``draw_bands`` gave it."""
    if not isinstance(ax.xaxis.get_major_locator(), matplotlib.ticker.FixedLocator):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
