"""One results folder's files (docs/design.md, "Results layout"): which Parquet files of
each table belong to the study (those study.json's ``trial_ids`` plans, where it lists them),
its study.json, and each table read into one Arrow table with one ``trial_id`` type.

The Parquet schema lives in ``study.results`` (which imports only pyarrow); this module only
reads it, so the analysis never needs torch or Ray.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from common.cli import first_few
from study import epoch_parts, results

#: The tables a study may hold; ``probes`` is optional, the others may be empty while running.
TABLE_NAMES: tuple[str, ...] = ("trials", "epochs", "layers", "steps", "probes")

_ID_TYPE = pa.dictionary(pa.int32(), pa.string())


class ResultsError(Exception):
    """A problem with the results folder that the user can fix (message names the file)."""


@dataclass
class Folder:
    """One results folder's study.json, table files and trials rows."""

    root: Path
    config: dict
    files: dict[str, list[Path]]
    trials: pd.DataFrame


def read_folder(root: Path, notices: list[str], prefix: str) -> Folder:
    """Read ``root``'s study.json, table files and trials rows; notices go to ``notices``,
    each starting with ``prefix``. Raises :class:`ResultsError` where it holds no study."""
    if not root.exists():
        raise ResultsError(f"results folder {root} does not exist")
    if not root.is_dir():
        raise ResultsError(f"{root} is not a folder (expected a results folder)")
    files = {name: table_files(root / name) for name in TABLE_NAMES}
    if not any(files.values()):
        studies = sorted(str(d) for d in root.iterdir() if d.is_dir() and table_files(d / "trials"))
        hint = f"; it holds studies in {', '.join(studies)}: pass one of them" if studies else ""
        raise ResultsError(
            f"{root} holds no results: no Parquet files under "
            + ", ".join(f"{name}/" for name in TABLE_NAMES)
            + hint
        )
    if not files["trials"]:
        raise ResultsError(f"{root}: no trials table (trials/*.parquet), so runs cannot be grouped")

    config = read_config(root, notices)
    planned = _planned_ids(config)
    if planned is not None:
        files = _only_planned(root, files, planned, notices, prefix)
    trials = read_table(files["trials"], "trials").to_pandas()
    if planned is not None:  # a file named after a planned trial may still hold another's row
        trials = trials[trials["trial_id"].astype(str).isin(planned)]
    return Folder(root, config, files, trials)


def table_files(folder: Path) -> list[Path]:
    """The Parquet files of one table's folder: each trial's compacted file and the per-epoch
    parts in its subfolder (``study.results``), without hidden and half-written ones."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        if p.is_dir() and not p.name.startswith("."):  # a trial's parts (temporary names excluded)
            found.extend(q for q in p.iterdir() if epoch_parts.part_epoch(q.name) is not None and q.is_file())
        elif (p.suffix == ".parquet" and not p.name.startswith(".")
              and not p.name.endswith(results.TMP_SUFFIX) and p.is_file()):
            found.append(p)
    return sorted(found)


def trial_of(path: Path) -> str:
    """The trial a table file holds rows of: a part's folder's name, else the file's stem."""
    return path.parent.name if epoch_parts.part_epoch(path.name) is not None else path.stem


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
    kept = {name: [p for p in paths if trial_of(p) in planned] for name, paths in files.items()}
    other = [p for name, paths in files.items() for p in paths if trial_of(p) not in planned]
    if other:
        ids = sorted({trial_of(p) for p in other})
        notices.append(
            f"{prefix}{len(other)} file(s) of {len(ids)} trial(s) not in study.json's trial_ids were "
            f"left out: {first_few(ids)}"
        )
    if files["trials"] and not kept["trials"]:
        raise ResultsError(
            f"{root}: none of its trials/*.parquet files is of a trial listed in "
            f"{root / 'study.json'} (trial_ids); is it the study's results folder?"
        )
    return kept


def read_table(paths: list[Path], table: str, columns: Sequence[str] | None = None) -> pa.Table:
    """``paths`` (files of ``table``) as one Arrow table of ``columns`` (default: all), with
    ``trial_id`` dictionary-encoded; a column a file lacks is null there. A trial whose rows
    are (also) in per-epoch parts is read as ``study.results`` merges them: a part's rows
    replace its epoch's rows of the compacted file, in the compacted file's row order."""
    schema = results.TABLES[table]
    wanted = list(schema.names) if columns is None else list(dict.fromkeys(columns))
    unknown = [c for c in wanted if c not in schema.names]
    if unknown:
        raise ValueError(f"unknown columns for table {table!r}: {unknown}")
    by_trial: dict[str, list[Path]] = {}  # in the order given: sorted paths order trials as before
    for p in paths:
        by_trial.setdefault(trial_of(p), []).append(p)
    parts = [_read_trial(found, table, wanted) for found in by_trial.values()]
    fields = [schema.field(c) for c in wanted]
    fields = [f.with_type(_ID_TYPE) if f.name == "trial_id" else f for f in fields]
    empty = pa.schema(fields).empty_table()
    parts = [empty, *parts]
    try:
        merged = pa.concat_tables(parts, promote_options="permissive")
    except pa.ArrowException as exc:
        raise ResultsError(f"{paths[0].parent}: files do not share one schema ({exc})") from exc
    return merged.select(wanted)


def _read_trial(paths: list[Path], table: str, wanted: list[str]) -> pa.Table:
    """One trial's rows of ``table`` from its compacted file, its parts or both."""
    new_parts = [p for p in paths if epoch_parts.part_epoch(p.name) is not None]
    if not new_parts:  # one compacted file (several only where folders overlap: refused elsewhere)
        return pa.concat_tables([_read_file(p, table, wanted) for p in paths], promote_options="permissive")
    if table == "trials":
        raise ResultsError(f"{new_parts[0]}: the trials table has no per-epoch parts")
    # merge needs each row's epoch (which parts replace) besides the sort keys
    keyed = list(dict.fromkeys([*wanted, *results.SORT_KEYS[table], "epoch"]))
    compacted = [_read_file(p, table, keyed) for p in paths if p not in new_parts]
    merged = epoch_parts.merge(table, compacted[0] if compacted else None,
                               [_read_file(p, table, keyed) for p in new_parts])
    return merged.select([c for c in wanted if c in merged.column_names])


def trial_rows(paths: list[Path], table: str) -> dict[str, int]:
    """Rows per trial id in ``paths`` (one trial's files, or a folder's), as ``read_table``
    would return them. A trial's single compacted file is counted from its footer (its
    ``trial_id`` statistics name that trial alone), without reading a column."""
    if len(paths) == 1 and epoch_parts.part_epoch(paths[0].name) is None:
        with _reading(paths[0]):
            meta = _open(paths[0], table).metadata
            if _holds_only(meta, trial_of(paths[0])):
                return {trial_of(paths[0]): meta.num_rows} if meta.num_rows else {}
    ids = to_pandas(read_table(paths, table, ["trial_id"]))["trial_id"]
    counts = ids.value_counts(sort=False)
    return {str(t): int(n) for t, n in counts.items() if n > 0}


def _holds_only(meta: pq.FileMetaData, trial_id: str) -> bool:
    """Whether every row group's ``trial_id`` statistics say it holds ``trial_id`` only."""
    names = meta.schema.to_arrow_schema().names
    if "trial_id" not in names:
        return False
    column = names.index("trial_id")
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(column).statistics
        if (stats is None or not stats.has_min_max or stats.null_count != 0
                or stats.min != trial_id or stats.max != trial_id):
            return False
    return True


def _open(path: Path, table: str) -> pq.ParquetFile:
    """``path`` opened, its schema version and table checked (``_reading`` turns errors into
    :class:`ResultsError`)."""
    pf = pq.ParquetFile(path, read_dictionary=["trial_id"])
    meta = pf.schema_arrow.metadata
    results.check_version(path, meta)
    stored = (meta or {}).get(results.TABLE_KEY)
    if stored is not None and stored.decode() != table:
        raise ResultsError(f"{path}: holds table {stored.decode()!r}, not {table!r}")
    return pf


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """What goes wrong reading ``path``, as one :class:`ResultsError` naming it."""
    try:
        yield
    except results.SchemaVersionError as exc:
        raise ResultsError(str(exc)) from exc
    except KeyError as exc:  # read_dictionary names a column the file lacks: a foreign file
        raise ResultsError(f"{path}: not a bnstudy results file (no trial_id column)") from exc
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ResultsError(f"{path}: not a readable Parquet file ({exc})") from exc


def _read_file(path: Path, table: str, columns: list[str]) -> pa.Table:
    with _reading(path):
        pf = _open(path, table)
        present = [c for c in columns if c in pf.schema_arrow.names]
        data = pf.read(columns=present)
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


def to_pandas(table: pa.Table) -> pd.DataFrame:
    """``table`` as a DataFrame whose ``trial_id`` is categorical."""
    df = table.to_pandas()
    if "trial_id" in df and not isinstance(df["trial_id"].dtype, pd.CategoricalDtype):
        df["trial_id"] = df["trial_id"].astype("category")
    return df


def read_config(root: Path, notices: list[str]) -> dict:
    """``root``'s study.json, or {} where it has none or it cannot be read (with a notice)."""
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
