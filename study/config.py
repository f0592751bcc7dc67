"""One trial's configuration: a frozen, validated dataclass (docs/design.md, "The experiment").

``TrialConfig`` is the one validator of a trial's settings; the sweep's command line builds
TrialConfigs and names its own flag for the setting a ``ConfigError`` names.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from study.image_format import CONV_WIDTHS
from study.results import NOISE_SCOPES, NORMS, PARAM_DEFAULTS, VARIANTS, trial_id


class ConfigError(ValueError):
    """A bad configuration value; the message is meant for the user as is.

    ``setting`` is the TrialConfig field at fault (None: not one field) and ``rule`` what is
    wrong with it, so that a command line can name its own flag instead of the field."""

    def __init__(self, rule: str, setting: str | None = None) -> None:
        super().__init__(f"{setting}: {rule}" if setting else rule)
        self.rule, self.setting = rule, setting


def _shown(value: object) -> str:
    """A number as a flag would give it (``1e-05``, ``-1``), anything else as Python writes it."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:g}"
    return repr(value)


#: The paper's step-size grid, as multiples of the learning rate: 8 log-spaced points in [0.5, 4]
#: (the sweep's default for --probe-etas). Here, not in study.probes: the driver needs no torch.
DEFAULT_ETA_MULTIPLES: tuple[float, ...] = tuple(0.5 * 8 ** (i / 7) for i in range(8))


@dataclass(frozen=True)
class TrialConfig:
    """Everything that determines one trial's numbers. The defaults are the seed notebook's
    training settings; its noise draws are per layer (``noise_scope="layer"``, the ``seed``
    preset), the default here is per channel, as in the paper's Algorithm 1. ``p`` and
    ``groups`` belong to the variants that take them (``study.variants``): None for the others,
    and the registry's default for those where not given."""

    norm: str = "batch"
    noise: float = 0.0
    noise_scope: str = "channel"
    p: float | None = None  # lp_batch: the ℓp norm's p, >= 1 or inf
    groups: int | None = None  # group: GroupNorm's group count
    lr: float = 1e-3
    momentum: float = 0.9
    batch_size: int = 16
    epochs: int = 10
    seed: int = 0
    grad_every: int = 1
    val_fraction: float = 0.2
    split_seed: int = 0
    hist_bins: int = 128
    hist_range: float = 8.0
    hist_every: int = 50
    eval_batch_size: int = 1000
    probe_every: int = 0
    probe_etas: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ConfigError:
            return ConfigError(rule, setting=name)

        if self.norm not in NORMS:
            raise bad("norm", f"unknown norm {self.norm!r}; known: {', '.join(NORMS)}")
        takes = VARIANTS[self.norm].params
        for name in ("noise", "p", "groups"):  # a parameter only where the variant takes it
            value, absent = getattr(self, name), (0.0 if name == "noise" else None)
            if value is None and name in takes:
                object.__setattr__(self, name, value := PARAM_DEFAULTS[name])
            if value != absent and name not in takes:
                owners = sorted(v.name for v in VARIANTS.values() if name in v.params)
                raise bad(name, f"only {', '.join(owners)} takes {name}, got {_shown(value)} "
                          f"for {self.norm}")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise bad("noise", f"noise magnitudes must be >= 0, got {_shown(self.noise)}")
        if self.p is not None and not (isinstance(self.p, (int, float)) and self.p >= 1):
            raise bad("p", f"the ℓp norm's p must be >= 1 or inf, got {_shown(self.p)}")
        if self.groups is not None and not (isinstance(self.groups, int) and self.groups >= 1
                                            and all(w % self.groups == 0 for w in CONV_WIDTHS)):
            raise bad("groups", f"the group count must divide every conv layer's channels "
                      f"({', '.join(map(str, CONV_WIDTHS))}), got {_shown(self.groups)}")
        if self.noise_scope not in NOISE_SCOPES:
            raise bad("noise_scope", f"must be one of {', '.join(NOISE_SCOPES)}, got {self.noise_scope!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", f"learning rates must be > 0, got {_shown(self.lr)}")
        if not (0 <= self.momentum < 1):
            raise bad("momentum", f"must be in [0, 1), got {_shown(self.momentum)}")
        for name in ("batch_size", "epochs", "grad_every", "hist_bins", "hist_every", "eval_batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise bad(name, f"must be an integer >= 1, got {_shown(value)}")
        if not isinstance(self.seed, int):
            raise bad("seed", f"seeds must be integers, got {_shown(self.seed)}")
        if self.seed < 0:
            raise bad("seed", "seeds must be >= 0")
        if not (0 < self.val_fraction < 1):
            raise bad("val_fraction", f"must be in (0, 1), got {_shown(self.val_fraction)}")
        if not self.hist_range > 0:
            raise bad("hist_range", f"must be > 0, got {_shown(self.hist_range)}")
        if not (isinstance(self.probe_every, int) and self.probe_every >= 0):
            raise bad("probe_every", f"must be an integer >= 0 (0 = off), got {_shown(self.probe_every)}")
        if any(not (math.isfinite(e) and e > 0) for e in self.probe_etas):
            etas = ", ".join(_shown(e) for e in self.probe_etas)
            raise bad("probe_etas", f"step sizes must be > 0, got {etas}")
        object.__setattr__(self, "noise", float(self.noise))
        if self.p is not None:
            object.__setattr__(self, "p", float(self.p))
        object.__setattr__(self, "lr", float(self.lr))
        object.__setattr__(self, "probe_etas", tuple(float(e) for e in self.probe_etas))

    @property
    def trial_id(self) -> str:
        """A readable, unique key of the grid point: the results file name and Tune's trial name."""
        return trial_id(self.norm, self.noise, self.lr, self.seed, p=self.p, groups=self.groups)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> TrialConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown trial settings: {', '.join(sorted(unknown))}")
        d = dict(d)
        if "probe_etas" in d:
            d["probe_etas"] = tuple(d["probe_etas"])
        return cls(**d)
