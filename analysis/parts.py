"""A study run in parts (other seeds or learning rates, on other clusters) and read as one:
the folders must be distinct, no trial may be in two, and their trials must agree in every
setting but the grid's."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from analysis.folder import Folder, ResultsError, trial_of
from study import results

#: The keys of a trial's config that place it in the grid (its norm at its parameters, lr,
#: seed); the others are the study's settings.
GRID_KEYS = ("norm", *results.PARAMS, "lr", "seed")
#: Trial settings that must agree across the folders of one study (with every setting in the
#: trials' configs but the grid's): runs that differ in them do not belong in one band.
SHARED_SETTINGS = ("dataset", "train_size", "val_size", "test_size", "epochs", "batch_size",
                   "momentum", "noise_scope", "grad_every", "probe_every")


def check_distinct(roots: Sequence[Path]) -> None:
    """Refuse a folder given twice, by the same path or another."""
    seen: dict[Path, Path] = {}
    for root in roots:
        first = seen.setdefault(root.resolve(), root)
        if first is not root:
            raise ResultsError(f"{root} is given twice" if first == root
                               else f"{root} is the same folder as {first}, given before it")


def check_parts(folders: list[Folder]) -> None:
    """Several folders are one study only if no trial is in two and their settings agree."""
    where: dict[str, Path] = {}
    for f in folders:
        ids = [*f.trials["trial_id"].astype(str), *(trial_of(p) for paths in f.files.values() for p in paths)]
        for tid in dict.fromkeys(ids):
            if tid in where:
                raise ResultsError(
                    f"trial {tid} is in both {where[tid]} and {f.root}: a trial can be analysed "
                    "once (leave one folder out, or rerun the sweep with --extend to grow one study)"
                )
            where[tid] = f.root
    each = [trial_settings(f.trials) for f in folders]
    for key in dict.fromkeys(k for s in each for k in s):
        values = [s.get(key, []) for s in each]
        if any(v != values[0] for v in values[1:]):
            shown = "; ".join(f"{f.root}: {', '.join(v) or 'none'}" for f, v in zip(folders, values,
                                                                                  strict=True))
            raise ResultsError(
                f"the folders' trials differ in {key} ({shown}); runs with other settings "
                "do not belong in one band: analyse each folder on its own"
            )


def trial_settings(trials: pd.DataFrame) -> dict[str, list[str]]:
    """Each setting's values among ``trials``: the ``SHARED_SETTINGS`` columns and every key of
    the trials' configs (config_json) but the grid's (norm, noise, p, groups, lr, seed)."""
    found: dict[str, set[str]] = {}
    for col in SHARED_SETTINGS:
        if col in trials:
            found[col] = {str(v) for v in trials[col].dropna().unique()}
    for text in trials.get("config_json", pd.Series(dtype=object)).dropna().unique():
        try:
            config = json.loads(text)
        except ValueError:
            continue
        for key, value in config.items() if isinstance(config, dict) else ():
            if key not in GRID_KEYS and key not in SHARED_SETTINGS:
                found.setdefault(key, set()).add(json.dumps(value, sort_keys=True))
    return {key: sorted(values) for key, values in found.items()}
