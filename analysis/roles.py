"""The parts the variants play in the comparisons, read from the variant registry
(``study.results.VARIANTS``): the variants that take noise are compared against the
references (``Variant.reference``: the seed's pair), whose first in registry order is the
baseline without normalisation (no BN) that the others (BN) normalise."""

from __future__ import annotations

from study import results

#: The reference variants, in registry order (no BN, BN).
REFERENCE_NORMS: tuple[str, ...] = tuple(n for n in results.NORMS if results.VARIANTS[n].reference)
#: The variant without normalisation (no BN).
BASELINE_NORM: str = REFERENCE_NORMS[0]
#: The variants that take noise, in registry order (noisy BN).
NOISY_NORMS_IN_ORDER: tuple[str, ...] = tuple(n for n in results.NORMS if n in results.NOISY_NORMS)
