"""Gradient stability of each run, in numbers: how much the global gradient norm moves once
training is under way (docs/design.md, "The experiment": "gradient magnitudes stay stable
with BN and noisy BN, and swing without BN"). Figure 3 shows the curves; these are the
quantities to compare across variants, per run, over its recorded steps after the first
``skip_epochs`` epochs (the early climb or fall of the norm is its level settling, not its
stability).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: column -> (its table header, what it is), in the order the table shows them.
STABILITY_METRICS = {
    "median_norm": ("median ‖g‖", "the median gradient norm"),
    "cv": ("CV", "its coefficient of variation (std ÷ mean)"),
    "step_change": ("median |Δ log ‖g‖|", "the median change of its log from one recorded step "
                    "to the next"),
    "max_over_median": ("max ÷ median", "its largest value ÷ its median"),
}


def run_stability(norms: np.ndarray) -> dict[str, float]:
    """The four ``STABILITY_METRICS`` of one run's gradient norms, in step order (finite
    values only: a diverged run's last norms are not). NaN where fewer than two are left."""
    g = np.asarray(norms, dtype=np.float64)
    g = g[np.isfinite(g) & (g > 0)]
    if len(g) < 2:
        return dict.fromkeys(STABILITY_METRICS, float("nan"))
    median = float(np.median(g))
    return {
        "median_norm": median,
        "cv": float(g.std() / g.mean()),
        "step_change": float(np.median(np.abs(np.diff(np.log(g))))),
        "max_over_median": float(g.max() / median),
    }


def gradient_stability(steps: pd.DataFrame, skip_epochs: int = 1,
                       layers: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per run (``trial_id``) with ``STABILITY_METRICS`` of its global gradient norm
    over its steps-table rows whose ``epoch`` is past ``skip_epochs``, ``steps`` (how many
    rows that was), and the same of each of ``layers``' norms (``grad_norm_<layer>``) as
    ``<metric>_<layer>``."""
    return stability_frame([stability_row(run, skip_epochs, layers)
                            for _, run in steps.groupby("trial_id", observed=True, sort=True)], layers)


def stability_row(run: pd.DataFrame, skip_epochs: int, layers: tuple[str, ...]) -> dict:
    """``gradient_stability``'s row of one run, from its steps-table rows ``run``."""
    used = np.flatnonzero(run["epoch"].to_numpy() > skip_epochs)
    # the order sort_values("step") gives (numpy's quicksort), without a sorted copy of the frame
    used = used[np.argsort(run["step"].to_numpy()[used], kind="quicksort")]
    row = {"trial_id": str(run["trial_id"].iloc[0]), "steps": len(used)}
    for suffix, column in _sources(layers).items():
        row |= {f"{k}{suffix}": v for k, v in run_stability(run[column].to_numpy()[used]).items()}
    return row


def stability_frame(rows: list[dict], layers: tuple[str, ...]) -> pd.DataFrame:
    """``gradient_stability``'s table of the runs' ``stability_row`` rows."""
    metrics = [f"{m}{suffix}" for suffix in _sources(layers) for m in STABILITY_METRICS]
    return pd.DataFrame(rows, columns=["trial_id", "steps", *metrics])


def _sources(layers: tuple[str, ...]) -> dict[str, str]:
    """Column-name suffix -> the steps column it is of."""
    return {"": "grad_norm", **{f"_{layer}": f"grad_norm_{layer}" for layer in layers}}
