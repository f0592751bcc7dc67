"""How every output writes numbers and variants: short numbers, accuracies in percent,
variant labels (``noisy BN (noise 1)``, ``ℓ1 BN``) and their order, from the variant registry
(``study.results.VARIANTS``)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import PurePath

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


def variant_label(norm: str, noise: float, p: float | None = None, groups: int | None = None,
                  scope: str | None = None) -> str:
    """The label of one variant at its parameters, e.g. ``noisy BN (noise 1)``, ``ℓ∞ BN``,
    ``GN (8 groups)`` (the registry's ``Variant.label_for``); with the noise ``scope`` (the
    legends), ``noisy BN (noise 1, per channel)``.

    Noise only distinguishes variants where it is applied: a variant that takes noise always
    shows it (and its scope, where given), others only when it is non-zero. A norm the
    registry does not know is labelled with its name.
    """
    known = results.VARIANTS.get(norm)
    name = known.label_for(_given(p), _given(groups)) if known is not None else str(norm)
    noise = _given(noise) or 0.0
    takes_noise = known is not None and known.takes_noise
    if takes_noise or noise != 0:
        where = f", {SCOPE_WORDS.get(scope, scope)}" if takes_noise and isinstance(scope, str) else ""
        return f"{name} (noise {format_number(noise)}{where})"
    return name


def dataset_label(spec: str) -> str:
    """A dataset as a caption names it, without a local path: ``imagefolder:/data/cifar10_jpeg``
    reads ``image folder cifar10_jpeg`` (where the folder lies is no part of the result)."""
    if spec.startswith("imagefolder:"):
        return f"image folder {PurePath(spec[len('imagefolder:'):]).name or '?'}"
    return spec


def datasets_words(specs: Iterable[str]) -> str:
    """``Dataset: cifar10.`` for a caption or a table's note (``dataset_label`` of each)."""
    return f"Dataset: {', '.join(dict.fromkeys(dataset_label(s) for s in specs))}."


#: How a noise scope (``study.results.NOISE_SCOPES``) reads in a legend.
SCOPE_WORDS = {"channel": "per channel", "layer": "per layer",
               "sample_channel": "per image and channel"}


def variant_sort_key(norm: str, noise: float, p: float | None = None, groups: int | None = None) -> tuple:
    """Registry order, then unknown norms by name; by noise, p and groups within a norm."""
    rank = results.NORMS.index(norm) if norm in results.NORMS else len(results.NORMS)
    return (rank, str(norm), float(_given(noise) or 0.0), float(_given(p) or 0.0), float(_given(groups) or 0))
