"""The sweep's grid: its presets, the trials a preset makes, and the work they are (--dry-run)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

from study.config import TrialConfig
from study.data import split_sizes
from study.variants import PARAMS, VARIANTS

#: Rough per-trial training speed (images/s) for --dry-run's estimate, batch 16: on a CPU, one
#: trial with 1 thread on a 2-core VM; on a GPU, one of 8 trials sharing an H200 without MPS.
NOMINAL_IMAGES_PER_S = {"cpu": 1800.0, "gpu": 4100.0}
NOMINAL_SIZES = {"cifar10": (50_000, 10_000), "synthetic": (50_000, 10_000)}


#: The preset's list of each variant parameter's values (``study.variants.PARAMS``).
PARAM_LISTS = {"noise": "noises", "p": "ps", "groups": "groups"}


@dataclass(frozen=True)
class Preset:
    """A study's grid (norms × each variant's parameters × lrs × seeds) and the settings its
    trials share. A variant's parameters (noises, ps, groups) vary only its own trials.

    Every value is checked as ``TrialConfig`` checks it (``ConfigError``), a parameter's values
    too where no variant of the grid takes them: a bad value is refused even where it changes
    nothing."""

    norms: tuple[str, ...]
    noises: tuple[float, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    epochs: int
    batch_size: int = 16
    dataset: str = "cifar10"
    subset: int | None = None
    noise_scope: str = "channel"
    ps: tuple[float, ...] = (1.0, 2.0, math.inf)  # the paper's three ℓp norms
    groups: tuple[int, ...] = (8,)

    def __post_init__(self) -> None:
        base = TrialConfig(noise_scope=self.noise_scope, batch_size=self.batch_size, epochs=self.epochs)
        settings = [dict(norm=n) for n in self.norms]
        for param in PARAMS:
            owner = next(v.name for v in VARIANTS.values() if param in v.params)
            settings += [{"norm": owner, param: v} for v in self.values(param)]
        settings += [dict(lr=v) for v in self.lrs] + [dict(seed=s) for s in self.seeds]
        for s in settings:
            replace(base, **s)

    def values(self, param: str) -> tuple:
        """The grid's values of a variant parameter (``study.variants.PARAMS``)."""
        return getattr(self, PARAM_LISTS[param])


PRESETS: dict[str, Preset] = {
    "full": Preset(("none", "batch", "noisy_batch"), (0.5, 1.0, 2.0), (1e-3, 1e-2, 5e-2),
                   tuple(range(5)), epochs=10),
    # the seed notebook's three runs; it shares one noise draw across a layer's channels
    "seed": Preset(("none", "batch", "noisy_batch"), (1.0,), (1e-3,), (0, 1, 2), epochs=10,
                   noise_scope="layer"),
    "smoke": Preset(("none", "batch", "noisy_batch"), (1.0,), (1e-2,), (0, 1), epochs=2,
                    dataset="auto", subset=3000),
    # issue 23: every normalisation beside BN, at the seed's settings and a 10x higher lr
    "norms": Preset(("none", "batch", "noisy_batch", "lp_batch", "group", "layer"), (1.0,),
                    (1e-3, 1e-2), tuple(range(5)), epochs=10),
}


#: The preset's lists that make the grid, and the trial fields that place a trial in it.
GRID_KEYS = ("norms", "noises", "ps", "groups", "lrs", "seeds")
TRIAL_GRID_KEYS = ("norm", "noise", "p", "groups", "lr", "seed")


def build_grid(p: Preset, grad_every: int = 1, probe_every: int = 0,
               probe_etas: tuple[float, ...] = ()) -> list[TrialConfig]:
    """norm × its parameters × lr × seed: each parameter (noise, p, groups) varied only for
    the variants that take it, so the grid holds no duplicate trials."""
    grid = []
    for norm in p.norms:
        takes = VARIANTS[norm].params if norm in VARIANTS else ()  # an unknown norm: TrialConfig says so
        for values in itertools.product(*(p.values(k) for k in takes)):
            params = dict(zip(takes, values, strict=True))
            for lr in p.lrs:
                for seed in p.seeds:
                    grid.append(TrialConfig(
                        norm=norm, noise_scope=p.noise_scope, lr=lr,
                        batch_size=p.batch_size, epochs=p.epochs, seed=seed,
                        grad_every=grad_every, probe_every=probe_every, probe_etas=probe_etas,
                        **params))
    return grid


def params_text(c: TrialConfig) -> str:
    """The parameters the trial's variant takes, as --dry-run lists them (``noise=1 (channel)``)."""
    takes = VARIANTS[c.norm].params
    words = [f"{k}={getattr(c, k):g}" + (f" ({c.noise_scope})" if k == "noise" else "") for k in takes]
    return "".join(f" {w}" for w in words)


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 60:.0f} minutes" if seconds >= 60 else f"{seconds:.0f} seconds"


def dry_run_text(name: str, p: Preset, grid: list[TrialConfig], resources: dict) -> str:
    """--dry-run's description of the study: its trials, their resources, work and time."""
    n_train, n_test = NOMINAL_SIZES.get(p.dataset.split(":")[0], (50_000, 10_000))
    if p.dataset.startswith("imagefolder:"):
        from study.imagefolder import imagefolder_sizes

        n_train, n_test = imagefolder_sizes(p.dataset.split(":", 1)[1])
    if p.subset:
        n_train, n_test = min(n_train, p.subset), min(n_test, p.subset)
    fit = split_sizes(n_train, grid[0].val_fraction)[0] if grid else 0
    images = len(grid) * p.epochs * fit
    steps = len(grid) * p.epochs * math.ceil(fit / p.batch_size)
    kind = "gpu" if resources.get("GPU") else "cpu"
    hours = images / NOMINAL_IMAGES_PER_S[kind] / 3600
    lines = [f"study {name!r}: {len(grid)} trials on dataset {p.dataset}"]
    for c in grid:
        lines.append(f"  {c.trial_id:<34} norm={c.norm}{params_text(c)} lr={c.lr:g} seed={c.seed}")
    lines += [
        f"resources per trial: {resources}",
        f"work: {len(grid)} trials × {p.epochs} epochs × {fit:,} training images "
        f"= {images:,} images, {steps:,} steps (batch {p.batch_size})",
        f"estimate: ~{_duration(hours * 3600)} of trial time at ~{NOMINAL_IMAGES_PER_S[kind]:,.0f} images/s "
        f"per trial on {kind.upper()}; divide by the trials that run at once",
    ]
    return "\n".join(lines)
