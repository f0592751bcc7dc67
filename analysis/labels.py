"""How every output writes numbers and variants: short numbers, accuracies in percent,
variant labels (``noisy BN (noise 1)``) and their order, from the variant registry
(``study.results.VARIANTS``)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from study import results


def format_number(x: float) -> str:
    """Short form of a noise magnitude or learning rate (1, 0.5, 0.001, 5e-05)."""
    return f"{float(x):g}"


def percent_scale(values: pd.Series | np.ndarray) -> float:
    """100 if accuracies are stored as fractions (as training writes them), else 1."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return 100.0 if v.size == 0 or v.max() <= 1.0 else 1.0


def variant_label(norm: str, noise: float) -> str:
    """The label of one (norm, noise) pair, e.g. ``noisy BN (noise 1)``.

    Noise only distinguishes variants where it is applied: a variant that takes noise always
    shows it, others only when it is non-zero. A norm the registry does not know is labelled
    with its name.
    """
    known = results.VARIANTS.get(norm)
    name = known.label if known is not None else str(norm)
    noise = 0.0 if noise is None or (isinstance(noise, float) and math.isnan(noise)) else noise
    if (known is not None and known.takes_noise) or noise != 0:
        return f"{name} (noise {format_number(noise)})"
    return name


def variant_sort_key(norm: str, noise: float) -> tuple:
    """Registry order, then unknown norms by name; by noise within a norm."""
    rank = results.NORMS.index(norm) if norm in results.NORMS else len(results.NORMS)
    return (rank, str(norm), float(noise))
