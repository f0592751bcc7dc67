"""The norm-variant registry: every variant's name, label, colour and the parameters it takes.

A variant is one entry here plus its layer in ``study.model.NORM_LAYERS``; the sweep,
``TrialConfig``, the trial ids and the analysis (through ``study.results``) read everything
else from it. Imports nothing outside the standard library, so the analysis can read it
without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The parameters a variant may take (``TrialConfig`` fields), in the order trial ids name
#: them: the noise magnitude, the ℓp norm's p, GroupNorm's group count.
PARAMS: tuple[str, ...] = ("noise", "p", "groups")
#: Each parameter's value for a variant that takes it and is given none (``TrialConfig``;
#: ``noise`` is 0 for every variant that does not take it, the others are None there).
PARAM_DEFAULTS: dict[str, float | int] = {"noise": 0.0, "p": 2.0, "groups": 8}


@dataclass(frozen=True)
class Variant:
    """One norm variant as the study names, validates and draws it."""

    name: str  # the --norms value, the trials table's ``norm``, the trial id's first word
    label: str  # how figures and tables call it; ``{p}`` and ``{groups}`` are its parameters
    color: str  # its colour in every figure (Okabe-Ito, colour-blind safe)
    marker: str  # its marker where points are drawn
    params: tuple[str, ...] = ()  # the PARAMS its output depends on (the grid varies only these)
    reference: bool = False  # one of the seed's pair (no BN, BN) the others are compared against

    @property
    def takes_noise(self) -> bool:
        """Whether its output depends on ``noise``."""
        return "noise" in self.params

    def label_for(self, p: float | None = None, groups: int | None = None) -> str:
        """Its label at these parameters, e.g. ``ℓ1 BN`` or ``GN (8 groups)`` (the noise is
        added by the analysis, which shows it for every noisy variant)."""
        return self.label.format(p="∞" if p is not None and math.isinf(p) else _short(p),
                                 groups=_short(groups))


def _short(x: float | int | None) -> str:
    return "?" if x is None else f"{float(x):g}"


#: The registry, in the order tables and legends list the variants. The first entry is the
#: baseline without normalisation that the analysis compares the others against (analysis/roles.py).
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("none", "no BN", "#D55E00", "o", reference=True),
        Variant("batch", "BN", "#0072B2", "s", reference=True),
        Variant("noisy_batch", "noisy BN", "#009E73", "^", params=("noise",)),
        # Santurkar et al. 2018 §3.3: BN's centring, then ÷ the average ℓp norm (study/norms.py)
        Variant("lp_batch", "ℓ{p} BN", "#CC79A7", "v", params=("p",)),
        Variant("group", "GN ({groups} groups)", "#E69F00", "P", params=("groups",)),
        Variant("layer", "LN", "#56B4E9", "X"),
    )
}
#: Variant names, in registry order.
NORMS: tuple[str, ...] = tuple(VARIANTS)
#: Variants whose output depends on the noise magnitude.
NOISY_NORMS: frozenset[str] = frozenset(v.name for v in VARIANTS.values() if v.takes_noise)
#: Where noisy BN draws its noise: the distribution per channel, one draw per element (the
#: paper's Algorithm 1); the distribution per layer (the seed notebook); the distribution per
#: channel, one draw per image and channel, shared by its positions (docs/design.md).
NOISE_SCOPES: tuple[str, ...] = ("channel", "layer", "sample_channel")
