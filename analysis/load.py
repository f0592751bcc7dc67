"""Read a study (docs/design.md, "Results layout"), from one results folder or several that
hold its parts, into tidy pandas DataFrames joined with the trial configs.

Every per-trial table gets the trial's ``variant``, ``norm``, ``noise``, ``lr``, ``seed``,
``dataset`` and ``status`` columns, so a figure can group by them without another join.
The files are found and read by ``analysis.folder``, parts checked by ``analysis.parts``,
what is missing said by ``analysis.notices``; the trial columns are joined by
``analysis.join``. The steps table is read a trial at a time when used (``analysis.steps``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from analysis.folder import ResultsError, read_folder, read_table, to_pandas
from analysis.join import JOIN_COLUMNS, attach  # noqa: F401 (JOIN_COLUMNS: where it was)
from analysis.labels import variant_label, variant_sort_key
from analysis.notices import note_incomplete, note_not_started
from analysis.parts import check_distinct, check_parts
from analysis.steps import StepTable, read_steps
from study import results


@dataclass
class Study:
    """One study, read: the five tables, the sweep's settings and what is incomplete. Usually
    one results folder; several when the study was run in parts (``load_studies``)."""

    paths: tuple[Path, ...]
    trials: pd.DataFrame
    epochs: pd.DataFrame
    layers: pd.DataFrame
    steps: StepTable  # read a trial at a time (``analysis.steps``): too large to hold whole
    probes: pd.DataFrame | None
    configs: tuple[dict, ...] = ()  # each folder's study.json ({} where it has none)
    notices: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        """The (first) results folder."""
        return self.paths[0]

    @property
    def labels(self) -> list[str]:
        """A short name per folder: its own name, or the path as given where names repeat."""
        names = [p.name or p.resolve().name for p in self.paths]
        return names if len(set(names)) == len(names) else [str(p) for p in self.paths]

    @property
    def name(self) -> str:
        return " + ".join(self.labels)

    @property
    def config(self) -> dict:
        """The study.json of a study read from one folder ({} for several)."""
        return self.configs[0] if len(self.configs) == 1 else {}

    @property
    def variants(self) -> list[str]:
        """Variant labels in display order (registry order, by noise within a norm, then others)."""
        return list(self.trials["variant"].cat.categories)

    @property
    def lrs(self) -> list[float]:
        return sorted(float(x) for x in self.trials["lr"].dropna().unique())

    @property
    def datasets(self) -> list[str]:
        return sorted(str(x) for x in self.trials["dataset"].dropna().unique())


def load_study(path: str | Path, *, step_columns: Sequence[str] | None = None) -> Study:
    """Read ``path`` (a results folder) into a :class:`Study`.

    ``step_columns`` limits the ``steps`` columns read (besides trial_id, step and epoch). The
    steps table is not read whole (a full study has millions of step rows): ``Study.steps``
    reads it a trial at a time (``analysis.steps``). Where study.json lists ``trial_ids``, only those
    trials' files are read, so other runs left in the folder cannot skew the study. Raises
    :class:`ResultsError` for a missing folder, a folder without results, an unreadable file or
    an unknown schema version.
    """
    return load_studies([path], step_columns=step_columns)


def load_studies(paths: Sequence[str | Path], *, step_columns: Sequence[str] | None = None) -> Study:
    """Read results folders that hold parts of one study (seeds or learning rates run
    separately, on different clusters) as one :class:`Study`, as ``load_study`` reads one.

    Raises :class:`ResultsError` as ``load_study`` does, and where a folder is given twice, a
    trial is in two folders, or the folders' trials differ in a setting
    (``analysis.parts.trial_settings``).
    """
    roots = [Path(p) for p in paths]
    if not roots:
        raise ResultsError("no results folder given")
    check_distinct(roots)
    notices: list[str] = []
    several = len(roots) > 1
    folders = [read_folder(root, notices, f"{root}: " if several else "") for root in roots]
    if several:
        check_parts(folders)
    trials = _prepare_trials(pd.concat([f.trials for f in folders], ignore_index=True), notices)

    frames: dict[str, pd.DataFrame] = {}
    for name in ("epochs", "layers", "steps", "probes"):
        paths = [p for f in folders for p in f.files[name]]
        if name == "steps":  # its notices in the same order as when it was read whole
            steps = read_steps(paths, trials, step_columns, notices)
            continue
        frames[name] = attach(to_pandas(read_table(paths, name)), trials, name, notices)

    note_incomplete(trials, frames["epochs"], notices)
    for f in folders:
        note_not_started(f.config, trials, notices, f"{f.root}: " if several else "")
    has_probes = any(f.files["probes"] for f in folders)
    return Study(
        paths=tuple(roots),
        trials=trials,
        epochs=frames["epochs"],
        layers=frames["layers"],
        steps=steps,
        probes=frames["probes"] if has_probes else None,
        configs=tuple(f.config for f in folders),
        notices=notices,
    )


def select_norms(study: Study, norms: Sequence[str]) -> Study:
    """The part of ``study`` whose trials use one of ``norms`` (every parameter setting of
    each), for figures that would otherwise draw more variants than a reader can tell apart.

    Raises :class:`ResultsError` naming the study's norms where one of ``norms`` has no trial.
    """
    present = list(dict.fromkeys(study.trials["norm"].astype(str)))
    missing = [n for n in norms if n not in present]
    if missing:
        raise ResultsError(f"--norms {','.join(missing)}: not in the study (its norms: "
                           f"{', '.join(present)})")
    keep = study.trials["norm"].isin(list(norms)).to_numpy()
    trials = study.trials[keep].reset_index(drop=True)
    trials["variant"] = trials["variant"].cat.remove_unused_categories()
    ids = set(trials["trial_id"])

    def part(df: pd.DataFrame | None) -> pd.DataFrame | None:
        if df is None:
            return None
        df = df[df["trial_id"].astype(str).isin(ids)].reset_index(drop=True)
        for col in df.columns:  # categories of the variants left out would still be drawn
            if isinstance(df[col].dtype, pd.CategoricalDtype) and col != "trial_id":
                df[col] = df[col].cat.remove_unused_categories()
        return df

    return replace(study, trials=trials, epochs=part(study.epochs), layers=part(study.layers),
                   steps=replace(study.steps.select(ids), trials=trials), probes=part(study.probes),
                   notices=[*study.notices, f"drawn: the trials of {', '.join(norms)} only (--norms)"])


def _prepare_trials(trials: pd.DataFrame, notices: list[str]) -> pd.DataFrame:
    trials = trials.copy()
    trials["trial_id"] = trials["trial_id"].astype(str)
    dup = trials["trial_id"].duplicated(keep="last")
    if dup.any():
        notices.append(
            f"{int(dup.sum())} duplicate trial rows (same trial_id); the last one is used"
        )
        trials = trials[~dup]
    trials["norm"] = trials["norm"].fillna("unknown").astype(str)
    trials["noise"] = trials["noise"].fillna(0.0).astype(float)
    trials["status"] = trials["status"].fillna("unknown").astype(str)
    trials["dataset"] = trials["dataset"].fillna("unknown dataset").astype(str)
    odd = sorted(set(trials["status"]) - set(results.STATUSES))
    if odd:
        notices.append(f"unknown trial status {odd}; such trials are counted but not drawn")

    # a variant is its norm at its parameters (older folders' trials lack p and groups: null)
    settings = list(zip(*(trials[c] if c in trials else [None] * len(trials)
                          for c in ("norm", *results.PARAMS)), strict=True))
    ordered = sorted(settings, key=lambda s: variant_sort_key(*s))
    labels = list(dict.fromkeys(variant_label(*s) for s in ordered))
    trials["variant"] = pd.Categorical(
        [variant_label(*s) for s in settings],
        categories=labels,
        ordered=True,
    )
    order = ["variant", "lr", "seed", "trial_id"]
    return trials.sort_values(order, kind="stable").reset_index(drop=True)
