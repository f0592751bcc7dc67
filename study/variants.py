"""The norm-variant registry: every variant's name, label, colour and whether it takes noise.

A variant is one entry here plus its layer in ``study.model.NORM_LAYERS``; the sweep,
``TrialConfig`` and the analysis (through ``study.results``) read everything else from it.
Imports nothing outside the standard library, so the analysis can read it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """One norm variant as the study names, validates and draws it."""

    name: str  # the --norms value, the trials table's ``norm``, the trial id's first word
    label: str  # how figures and tables call it
    color: str  # its colour in every figure (Okabe-Ito, colour-blind safe)
    marker: str  # its marker where points are drawn
    takes_noise: bool  # whether its output depends on ``noise`` (the grid varies noise only for these)


#: The registry, in the order tables and legends list the variants. The first entry is the
#: baseline without normalisation that the analysis compares the others against (analysis/roles.py).
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("none", "no BN", "#D55E00", "o", takes_noise=False),
        Variant("batch", "BN", "#0072B2", "s", takes_noise=False),
        Variant("noisy_batch", "noisy BN", "#009E73", "^", takes_noise=True),
    )
}
#: Variant names, in registry order.
NORMS: tuple[str, ...] = tuple(VARIANTS)
#: Variants whose output depends on the noise magnitude.
NOISY_NORMS: frozenset[str] = frozenset(v.name for v in VARIANTS.values() if v.takes_noise)
#: Where noisy BN draws its noise distribution: per channel (the paper's Algorithm 1) or per
#: layer (the seed notebook).
NOISE_SCOPES: tuple[str, ...] = ("channel", "layer")
