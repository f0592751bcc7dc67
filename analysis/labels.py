"""How every output writes numbers and variants: short numbers, accuracies in percent,
variant labels (``noisy BN (noise 1)``, ``ℓ1 BN``) and their order, from the variant registry
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


def _given(x: float | None) -> float | None:
    """A parameter as the trials table holds it: None where the variant has none (null, NaN)."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def variant_label(norm: str, noise: float, p: float | None = None, groups: int | None = None) -> str:
    """The label of one variant at its parameters, e.g. ``noisy BN (noise 1)``, ``ℓ∞ BN``,
    ``GN (8 groups)`` (the registry's ``Variant.label_for``).

    Noise only distinguishes variants where it is applied: a variant that takes noise always
    shows it, others only when it is non-zero. A norm the registry does not know is labelled
    with its name.
    """
    known = results.VARIANTS.get(norm)
    name = known.label_for(_given(p), _given(groups)) if known is not None else str(norm)
    noise = _given(noise) or 0.0
    if (known is not None and known.takes_noise) or noise != 0:
        return f"{name} (noise {format_number(noise)})"
    return name


def variant_sort_key(norm: str, noise: float, p: float | None = None, groups: int | None = None) -> tuple:
    """Registry order, then unknown norms by name; by noise, p and groups within a norm."""
    rank = results.NORMS.index(norm) if norm in results.NORMS else len(results.NORMS)
    return (rank, str(norm), float(_given(noise) or 0.0), float(_given(p) or 0.0), float(_given(groups) or 0))
