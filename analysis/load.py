"""Read a results folder (DESIGN §5) into tidy pandas DataFrames joined with the trial configs.

The Parquet schema lives in ``study.results`` (which imports only pyarrow); this module only
reads it, so the analysis never needs torch or Ray. Every per-trial table gets the trial's
``variant``, ``norm``, ``noise``, ``lr``, ``seed``, ``dataset`` and ``status`` columns, so a
figure can group by them without another join.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from study import results

#: Trial columns copied onto every row of the per-trial tables.
JOIN_COLUMNS: tuple[str, ...] = ("variant", "norm", "noise", "lr", "seed", "dataset", "status")
#: The tables a study may hold; ``probes`` is optional, the others may be empty while running.
TABLE_NAMES: tuple[str, ...] = ("trials", "epochs", "layers", "steps", "probes")
#: Status values whose curves are drawn; diverged and failed runs are counted, not averaged.
OK_STATUSES: tuple[str, ...] = ("done", "running")

_ID_TYPE = pa.dictionary(pa.int32(), pa.string())
_NORM_LABELS = {"none": "no BN", "batch": "BN", "noisy_batch": "noisy BN"}
_NORM_ORDER = ("none", "batch", "noisy_batch")


class ResultsError(Exception):
    """A problem with the results folder that the user can fix (message names the file)."""


@dataclass
class Study:
    """One study, read: the five tables, the sweep's settings and what is incomplete. Usually
    one results folder; several when the study was run in parts (``load_studies``)."""

    paths: tuple[Path, ...]
    trials: pd.DataFrame
    epochs: pd.DataFrame
    layers: pd.DataFrame
    steps: pd.DataFrame
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
        """Variant labels in display order (no BN, BN, noisy BN by noise, then others)."""
        return list(self.trials["variant"].cat.categories)

    @property
    def lrs(self) -> list[float]:
        return sorted(float(x) for x in self.trials["lr"].dropna().unique())

    @property
    def datasets(self) -> list[str]:
        return sorted(str(x) for x in self.trials["dataset"].dropna().unique())


def format_number(x: float) -> str:
    """Short form of a noise magnitude or learning rate (1, 0.5, 0.001, 5e-05)."""
    return f"{float(x):g}"


def percent_scale(values: pd.Series | np.ndarray) -> float:
    """100 if accuracies are stored as fractions (as training writes them), else 1."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return 100.0 if v.size == 0 or v.max() <= 1.0 else 1.0


def variant_label(norm: str, noise: float) -> str:
    """The label of one (norm, noise) pair, e.g. ``noisy BN (noise 1)``.

    Noise only distinguishes variants where it is applied: ``noisy_batch`` always shows it,
    other norms only when it is non-zero (a future noisy variant of another norm).
    """
    name = _NORM_LABELS.get(norm, str(norm))
    noise = 0.0 if noise is None or (isinstance(noise, float) and math.isnan(noise)) else noise
    if norm == "noisy_batch" or noise != 0:
        return f"{name} (noise {format_number(noise)})"
    return name


def _variant_sort_key(norm: str, noise: float) -> tuple:
    rank = _NORM_ORDER.index(norm) if norm in _NORM_ORDER else len(_NORM_ORDER)
    return (rank, str(norm), float(noise))


def load_study(path: str | Path, *, step_columns: Sequence[str] | None = None) -> Study:
    """Read ``path`` (a results folder) into a :class:`Study`.

    ``step_columns`` limits the ``steps`` columns read (besides trial_id, step and epoch), since
    a full study has millions of step rows. Where study.json lists ``trial_ids``, only those
    trials' files are read, so other runs left in the folder cannot skew the study. Raises
    :class:`ResultsError` for a missing folder, a folder without results, an unreadable file or
    an unknown schema version.
    """
    return load_studies([path], step_columns=step_columns)


#: The keys of a trial's config that place it in the grid; the others are the study's settings.
GRID_KEYS = ("norm", "noise", "lr", "seed")
#: Trial settings that must agree across the folders of one study (with every setting in the
#: trials' configs but the grid's): runs that differ in them do not belong in one band.
SHARED_SETTINGS = ("dataset", "train_size", "val_size", "test_size", "epochs", "batch_size",
                   "momentum", "noise_scope", "grad_every", "probe_every")


def load_studies(paths: Sequence[str | Path], *, step_columns: Sequence[str] | None = None) -> Study:
    """Read results folders that hold parts of one study (seeds or learning rates run
    separately, on different clusters) as one :class:`Study`, as ``load_study`` reads one.

    Raises :class:`ResultsError` as ``load_study`` does, and where a folder is given twice, a
    trial is in two folders, or the folders' trials differ in a setting (``_settings``).
    """
    roots = [Path(p) for p in paths]
    if not roots:
        raise ResultsError("no results folder given")
    seen: dict[Path, Path] = {}
    for root in roots:
        first = seen.setdefault(root.resolve(), root)
        if first is not root:
            raise ResultsError(f"{root} is given twice" if first == root
                               else f"{root} is the same folder as {first}, given before it")
    notices: list[str] = []
    several = len(roots) > 1
    folders = [_read_folder(root, notices, f"{root}: " if several else "") for root in roots]
    if several:
        _check_parts(folders)
    trials = _prepare_trials(pd.concat([f.trials for f in folders], ignore_index=True), notices)

    frames: dict[str, pd.DataFrame] = {}
    for name in ("epochs", "layers", "steps", "probes"):
        columns = None
        if name == "steps" and step_columns is not None:
            columns = ["trial_id", "step", "epoch", *step_columns]
        arrow = _read_table([p for f in folders for p in f.files[name]], name, columns)
        frames[name] = _attach(_to_pandas(arrow), trials, name, notices)

    _note_incomplete(trials, frames["epochs"], notices)
    for f in folders:
        _note_not_started(f.config, trials, notices, f"{f.root}: " if several else "")
    has_probes = any(f.files["probes"] for f in folders)
    return Study(
        paths=tuple(roots),
        trials=trials,
        epochs=frames["epochs"],
        layers=frames["layers"],
        steps=frames["steps"],
        probes=frames["probes"] if has_probes else None,
        configs=tuple(f.config for f in folders),
        notices=notices,
    )


@dataclass
class _Folder:
    """One results folder's study.json, table files and trials rows."""

    root: Path
    config: dict
    files: dict[str, list[Path]]
    trials: pd.DataFrame


def _read_folder(root: Path, notices: list[str], prefix: str) -> _Folder:
    if not root.exists():
        raise ResultsError(f"results folder {root} does not exist")
    if not root.is_dir():
        raise ResultsError(f"{root} is not a folder (expected a results folder)")
    files = {name: _table_files(root / name) for name in TABLE_NAMES}
    if not any(files.values()):
        studies = sorted(str(d) for d in root.iterdir() if d.is_dir() and _table_files(d / "trials"))
        hint = f"; it holds studies in {', '.join(studies)}: pass one of them" if studies else ""
        raise ResultsError(
            f"{root} holds no results: no Parquet files under "
            + ", ".join(f"{name}/" for name in TABLE_NAMES)
            + hint
        )
    if not files["trials"]:
        raise ResultsError(f"{root}: no trials table (trials/*.parquet), so runs cannot be grouped")

    config = _read_config(root, notices)
    planned = _planned_ids(config)
    if planned is not None:
        files = _only_planned(root, files, planned, notices, prefix)
    trials = _read_table(files["trials"], "trials").to_pandas()
    if planned is not None:  # a file named after a planned trial may still hold another's row
        trials = trials[trials["trial_id"].astype(str).isin(planned)]
    return _Folder(root, config, files, trials)


def _check_parts(folders: list[_Folder]) -> None:
    """Several folders are one study only if no trial is in two and their settings agree."""
    where: dict[str, Path] = {}
    for f in folders:
        ids = [*f.trials["trial_id"].astype(str), *(p.stem for paths in f.files.values() for p in paths)]
        for tid in dict.fromkeys(ids):
            if tid in where:
                raise ResultsError(
                    f"trial {tid} is in both {where[tid]} and {f.root}: a trial can be analysed "
                    "once (leave one folder out, or rerun the sweep with --extend to grow one study)"
                )
            where[tid] = f.root
    settings = [_settings(f.trials) for f in folders]
    for key in dict.fromkeys(k for s in settings for k in s):
        values = [s.get(key, []) for s in settings]
        if any(v != values[0] for v in values[1:]):
            shown = "; ".join(f"{f.root}: {', '.join(v) or 'none'}" for f, v in zip(folders, values,
                                                                                  strict=True))
            raise ResultsError(
                f"the folders' trials differ in {key} ({shown}); runs with other settings "
                "do not belong in one band: analyse each folder on its own"
            )


def _settings(trials: pd.DataFrame) -> dict[str, list[str]]:
    """Each setting's values among ``trials``: the ``SHARED_SETTINGS`` columns and every key of
    the trials' configs (config_json) but the grid's (norm, noise, lr, seed)."""
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


def _table_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix == ".parquet"
        and not p.name.startswith(".")
        and not p.name.endswith(results.TMP_SUFFIX)
        and p.is_file()
    )


def _planned_ids(config: dict) -> set[str] | None:
    """The trial ids study.json lists, or None where it lists none (then every file is read)."""
    ids = config.get("trial_ids")
    if not isinstance(ids, list) or not ids:
        return None
    return {str(t) for t in ids}


def _only_planned(
    root: Path, files: dict[str, list[Path]], planned: set[str], notices: list[str], prefix: str = ""
) -> dict[str, list[Path]]:
    """Drop the files of trials study.json does not list (another grid run or copied into the
    folder), so that they are neither mixed into the study nor able to block it; say so once."""
    kept = {name: [p for p in paths if p.stem in planned] for name, paths in files.items()}
    other = [p for name, paths in files.items() for p in paths if p.stem not in planned]
    if other:
        ids = sorted({p.stem for p in other})
        notices.append(
            f"{prefix}{len(other)} file(s) of {len(ids)} trial(s) not in study.json's trial_ids were "
            f"left out: {', '.join(ids[:3])}{f', and {len(ids) - 3} more' if len(ids) > 3 else ''}"
        )
    if files["trials"] and not kept["trials"]:
        raise ResultsError(
            f"{root}: none of its trials/*.parquet files is of a trial listed in "
            f"{root / 'study.json'} (trial_ids); is it the study's results folder?"
        )
    return kept


def _read_table(paths: list[Path], table: str, columns: Sequence[str] | None = None) -> pa.Table:
    schema = results.TABLES[table]
    wanted = list(schema.names) if columns is None else list(dict.fromkeys(columns))
    unknown = [c for c in wanted if c not in schema.names]
    if unknown:
        raise ValueError(f"unknown columns for table {table!r}: {unknown}")
    parts = [_read_file(p, table, wanted) for p in paths]
    fields = [schema.field(c) for c in wanted]
    fields = [f.with_type(_ID_TYPE) if f.name == "trial_id" else f for f in fields]
    empty = pa.schema(fields).empty_table()
    parts = [empty, *parts]
    try:
        merged = pa.concat_tables(parts, promote_options="permissive")
    except pa.ArrowException as exc:
        raise ResultsError(f"{paths[0].parent}: files do not share one schema ({exc})") from exc
    return merged.select(wanted)


def _read_file(path: Path, table: str, columns: list[str]) -> pa.Table:
    try:
        pf = pq.ParquetFile(path, read_dictionary=["trial_id"])
        meta = pf.schema_arrow.metadata
        results.check_version(path, meta)
        stored = (meta or {}).get(results.TABLE_KEY)
        if stored is not None and stored.decode() != table:
            raise ResultsError(f"{path}: holds table {stored.decode()!r}, not {table!r}")
        present = [c for c in columns if c in pf.schema_arrow.names]
        data = pf.read(columns=present)
    except results.SchemaVersionError as exc:
        raise ResultsError(str(exc)) from exc
    except KeyError as exc:  # read_dictionary names a column the file lacks: a foreign file
        raise ResultsError(f"{path}: not a bnstudy results file (no trial_id column)") from exc
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ResultsError(f"{path}: not a readable Parquet file ({exc})") from exc
    # Unify the trial_id type so files with and without a dictionary concatenate.
    if "trial_id" in data.column_names:
        col = data.column("trial_id")
        if not pa.types.is_dictionary(col.type):
            data = data.set_column(
                data.schema.get_field_index("trial_id"),
                "trial_id",
                col.cast(pa.string()).dictionary_encode(),
            )
    return data


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    df = table.to_pandas()
    if "trial_id" in df and not isinstance(df["trial_id"].dtype, pd.CategoricalDtype):
        df["trial_id"] = df["trial_id"].astype("category")
    return df


def _read_config(root: Path, notices: list[str]) -> dict:
    path = root / "study.json"
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        notices.append(f"{path} could not be read ({exc}); the study's settings are not shown")
        return {}
    if not isinstance(config, dict):
        notices.append(f"{path} does not hold a JSON object; ignored")
        return {}
    return config


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

    pairs = sorted(
        {(n, z) for n, z in zip(trials["norm"], trials["noise"], strict=True)},
        key=lambda p: _variant_sort_key(*p),
    )
    labels = list(dict.fromkeys(variant_label(n, z) for n, z in pairs))
    trials["variant"] = pd.Categorical(
        [variant_label(n, z) for n, z in zip(trials["norm"], trials["noise"], strict=True)],
        categories=labels,
        ordered=True,
    )
    order = ["variant", "lr", "seed", "trial_id"]
    return trials.sort_values(order, kind="stable").reset_index(drop=True)


def _attach(df: pd.DataFrame, trials: pd.DataFrame, table: str, notices: list[str]) -> pd.DataFrame:
    """Copy the trial columns onto ``df`` through the trial_id codes (no row-wise merge)."""
    ids = df["trial_id"].cat
    pos = np.append(pd.Index(trials["trial_id"]).get_indexer(ids.categories), -1)
    row_pos = pos[ids.codes.to_numpy()]
    orphan = row_pos < 0
    if orphan.any():
        missing = sorted(set(df["trial_id"][orphan].astype(str)))
        notices.append(
            f"{table}: {int(orphan.sum())} rows of {len(missing)} trial(s) without a trials row "
            f"were ignored ({', '.join(missing[:5])}{', …' if len(missing) > 5 else ''})"
        )
        df = df[~orphan]
        row_pos = row_pos[~orphan]
    df = df.reset_index(drop=True)
    for col in JOIN_COLUMNS:
        source = trials[col]
        if isinstance(source.dtype, pd.CategoricalDtype):
            df[col] = pd.Categorical.from_codes(
                source.cat.codes.to_numpy()[row_pos], dtype=source.dtype
            )
        else:
            df[col] = source.to_numpy()[row_pos]
    for col in ("status", "norm", "dataset"):
        df[col] = df[col].astype("category")
    return df


def _note_not_started(config: dict, trials: pd.DataFrame, notices: list[str], prefix: str = "") -> None:
    """Trials the sweep planned (study.json ``trial_ids``) that have no trials row yet."""
    planned = config.get("trial_ids")
    if not isinstance(planned, list):
        return
    started = set(trials["trial_id"].astype(str))
    missing = [str(t) for t in planned if str(t) not in started]
    if missing:
        notices.append(
            f"{prefix}{len(missing)} of the study's {len(planned)} planned trials have not started: "
            + ", ".join(missing[:6])
            + (f", and {len(missing) - 6} more" if len(missing) > 6 else "")
        )


def _note_incomplete(trials: pd.DataFrame, epochs: pd.DataFrame, notices: list[str]) -> None:
    done_epochs = epochs.groupby("trial_id", observed=True)["epoch"].max()
    done_epochs.index = done_epochs.index.astype(str)
    have = trials["trial_id"].map(done_epochs).fillna(0).astype(int).to_numpy()
    want = trials["epochs"].fillna(0).astype(int).to_numpy()

    def describe(mask: np.ndarray, extra: str = "") -> str:
        items = [
            f"{tid} ({h}/{w} epochs{extra})"
            for tid, h, w in zip(trials["trial_id"][mask], have[mask], want[mask], strict=True)
        ]
        return ", ".join(items[:6]) + (f", and {len(items) - 6} more" if len(items) > 6 else "")

    status = trials["status"].to_numpy()
    running = status == "running"
    if running.any():
        notices.append(
            f"{int(running.sum())} trial(s) unfinished (running, or stopped: the sweep's --resume "
            "finishes them); their curves end early and they are "
            f"not in the accuracy means: {describe(running)}"
        )
    short = (status == "done") & (have < want)
    if short.any():
        notices.append(
            f"{int(short.sum())} trial(s) marked done have fewer epochs than configured: "
            f"{describe(short)}"
        )
    errors = trials[status == "error"]
    if len(errors):
        msgs = [
            f"{tid}: {str(err).splitlines()[0] if isinstance(err, str) and err else 'no message'}"
            for tid, err in zip(errors["trial_id"], errors["error"], strict=True)
        ]
        notices.append(
            f"{len(errors)} trial(s) failed with an error and are left out: "
            + "; ".join(msgs[:5])
            + (f"; and {len(msgs) - 5} more" if len(msgs) > 5 else "")
        )
    diverged = int((status == "diverged").sum())
    if diverged:
        notices.append(
            f"{diverged} trial(s) diverged (a non-finite loss); they are counted in the accuracy "
            "table and left out of the means and curves"
        )
    no_rows = (have == 0) & (status != "error")
    if no_rows.any():
        notices.append(f"{int(no_rows.sum())} trial(s) have no epoch rows yet")
