"""How each variant is drawn, the same in every figure: colour, line style, marker and label.

Colours and markers come from the variant registry (``study.results.VARIANTS``); a norm the
registry does not know gets one of ``EXTRA_COLORS`` and ``EXTRA_MARKER``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from analysis.labels import variant_label
from study import results

#: Okabe–Ito colours (colour-blind safe) for norms the registry does not know, in name order.
EXTRA_COLORS = ("#E69F00", "#56B4E9", "#CC79A7", "#F0E442", "#000000")
#: The marker of a norm the registry does not know.
EXTRA_MARKER = "D"
#: Line styles per setting among a variant's parameter values (smallest first: noise, p, groups).
NOISE_LINESTYLES = ("--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (8, 2)), "-")


@dataclass(frozen=True)
class VariantStyle:
    """How one variant is drawn, identical in every figure."""

    color: str | tuple[float, float, float]
    linestyle: str | tuple
    marker: str
    label: str  # the legend's words: the variant, and for a noisy one where its noise is drawn


def shade(color: str, t: float) -> tuple[float, float, float]:
    """``color`` lightened towards white (t < 0) or darkened towards black (t > 0) by |t|."""
    rgb = np.array(mcolors.to_rgb(color))
    target = np.ones(3) if t < 0 else np.zeros(3)
    return tuple(float(c) for c in rgb + abs(t) * (target - rgb))


def variant_styles(trials: pd.DataFrame) -> dict[str, VariantStyle]:
    """One colour per norm and one line style per setting of its parameters (noise, p,
    groups), fixed for the whole study; a norm with several settings also goes from light to
    dark as the setting grows, so that a dose-response reads at a glance."""
    params = [c for c in results.PARAMS if c in trials.columns]
    scopes = trials["noise_scope"] if "noise_scope" in trials else pd.Series(None, index=trials.index)
    pairs = trials[["variant", "norm", *params]].assign(scope=scopes).drop_duplicates("variant")
    settings = [tuple(v) for v in pairs[params].astype(float).fillna(0.0).to_numpy()]
    other_norms = sorted(set(pairs["norm"]) - set(results.VARIANTS))
    styles = {}
    for row, setting in zip(pairs.to_dict("records"), settings, strict=True):
        variant, norm, scope = row["variant"], row["norm"], row["scope"]
        known = results.VARIANTS.get(norm)
        if known is not None:
            color = known.color
        else:
            color = EXTRA_COLORS[other_norms.index(norm) % len(EXTRA_COLORS)]
        own = sorted({s for s, n in zip(settings, pairs["norm"], strict=True) if n == norm})
        if len(own) > 1:
            color = shade(color, -0.45 + 0.9 * own.index(setting) / (len(own) - 1))
        # A variant that takes a parameter: dashed family by setting; others: solid, then dashed.
        takes = known is not None and bool(known.params)
        rank = own.index(setting) + (0 if takes else -1)
        linestyle = "-" if rank < 0 else NOISE_LINESTYLES[min(rank, len(NOISE_LINESTYLES) - 1)]
        marker = known.marker if known is not None else EXTRA_MARKER
        # the legend names where the noise is drawn: the seed's per-layer draws and the
        # paper's per-channel ones are different variants of noisy BN
        label = variant_label(norm, row.get("noise"), row.get("p"), row.get("groups"),
                              scope=scope if isinstance(scope, str) else None)
        styles[str(variant)] = VariantStyle(color, linestyle, marker, label)
    return styles


def legend_handles(styles: dict[str, VariantStyle], variants: Sequence[str], markers: bool) -> list:
    """One legend entry per variant, drawn as its curves are."""
    return [
        Line2D(
            [],
            [],
            color=styles[v].color,
            ls=styles[v].linestyle,
            lw=1.8,
            marker=styles[v].marker if markers else None,
            ms=5,
            label=styles[v].label,
        )
        for v in variants
    ]
