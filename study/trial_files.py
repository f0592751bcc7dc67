"""One trial's rows of a per-epoch table on disk: a part file per epoch while the trial runs,
one compacted file once it ends, and reading either or both as one table (docs/design.md,
"Results layout")::

    RESULTS/<table>/<trial_id>/epoch=0007.parquet  epoch 7's rows, written when it is reported
    RESULTS/<table>/<trial_id>.parquet             the trial's rows, compacted when it ended

An epoch is written without reading or rewriting the others, so a report costs the same at
epoch 100 as at epoch 1. Each part is written atomically (``results.write_atomic``), so a
crash leaves whole epochs only, and an epoch reported again replaces its own part alone.
Compaction writes the merged file first and removes the parts after it, so a crash in
between leaves parts that repeat rows of the compacted file, which reading resolves as it
always does: where an epoch has a part, the part's rows replace that epoch's rows of the
compacted file (parts are newer: a trial resumed after it was compacted appends parts).

This module imports only pyarrow and the standard library (the analysis reads through it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from study import results, storage
from study.storage import Location

#: The tables written an epoch at a time (``trials`` is one row per trial, rewritten whole).
EPOCH_TABLES: tuple[str, ...] = ("epochs", "layers", "steps", "probes")
#: The tables a finished trial must hold rows in (``probes`` only where it was probed).
REQUIRED_TABLES: tuple[str, ...] = ("epochs", "layers", "steps")
_PART = re.compile(r"^epoch=(\d+)\.parquet$")

#: Each table's row order, in a compacted file and in a merged read.
SORT_KEYS: dict[str, tuple[str, ...]] = {
    "epochs": ("epoch",),
    "layers": ("epoch", "layer", "site"),
    "steps": ("step",),
    "probes": ("step", "layer"),
}


def part_folder(out_dir: str | os.PathLike, table: str, trial_id: str) -> Location:
    """The folder of the trial's per-epoch parts of ``table``."""
    return storage.join(_root(out_dir), table, trial_id)


def part_path(out_dir: str | os.PathLike, table: str, trial_id: str, epoch: int) -> Location:
    """Where epoch ``epoch``'s rows of ``table`` live until the trial is compacted."""
    return storage.join(part_folder(out_dir, table, trial_id), f"epoch={int(epoch):04d}.parquet")


def part_epoch(name: str) -> int | None:
    """The epoch a part file's name holds, or None where ``name`` is not a part's."""
    found = _PART.match(name)
    return int(found.group(1)) if found else None


def parts(out_dir: str | os.PathLike, table: str, trial_id: str) -> dict[int, Location]:
    """The trial's parts of ``table`` by epoch, in epoch order (none once it is compacted).
    One listing; files still being written (temporary names) are not parts."""
    folder = part_folder(out_dir, table, trial_id)
    found = {part_epoch(n): storage.join(folder, n) for n in storage.file_names(folder, ".parquet")}
    return {e: found[e] for e in sorted(e for e in found if e is not None)}


def write_epoch_rows(out_dir: str | os.PathLike, table: str, trial_id: str, new: pa.Table,
                     epoch: int | None = None) -> None:
    """Write ``new`` (rows of ``table``), one part per epoch it covers, each replacing the
    part of its epoch if there is one. Neither reads nor rewrites any other epoch.

    Args:
        out_dir: the results folder (a local path or a URI).
        table: one of ``EPOCH_TABLES``.
        trial_id: the trial the rows belong to.
        new: the rows, in ``results.TABLES[table]``'s schema.
        epoch: the epoch ``new`` is of, where it may have no rows (an epoch without a recorded
            step, when ``grad_every`` exceeds its steps): its part is then written empty, so
            that the table is not missing from a trial that ran.
    """
    epochs = sorted(set(new.column("epoch").to_pylist()))
    if not epochs and epoch is not None:
        results.write_atomic(new, part_path(out_dir, table, trial_id, epoch))
    for epoch in epochs:  # a trial reports one epoch at a time: one part, nothing filtered
        rows = new if len(epochs) == 1 else new.filter(pc.equal(new.column("epoch"), epoch))
        results.write_atomic(sort_rows(table, rows), part_path(out_dir, table, trial_id, epoch))


def merge(table: str, compacted: pa.Table | None, new_parts: Sequence[pa.Table]) -> pa.Table | None:
    """One trial's rows of ``table`` from its compacted file (or None) and its parts: the
    parts' rows replace the compacted file's rows of their epochs; sorted by ``SORT_KEYS``.
    The tables must share their columns, which must include the sort keys.

    Returns:
        The merged rows, or None where there are none of either.
    """
    if not new_parts:
        return compacted
    pieces = list(new_parts)
    if compacted is not None:
        covered = pa.array(sorted({e for p in pieces for e in p.column("epoch").to_pylist()}),
                           type=compacted.schema.field("epoch").type)
        keep = pc.invert(pc.is_in(compacted.column("epoch"), value_set=covered))
        pieces.insert(0, compacted.filter(keep))
    if len(pieces) == 1:
        return sort_rows(table, pieces[0])
    return sort_rows(table, pa.concat_tables(pieces, promote_options="permissive"))


def read_trial_table(out_dir: str | os.PathLike, table: str, trial_id: str,
                     columns: Sequence[str] | None = None) -> pa.Table | None:
    """The trial's rows of ``table`` in the current schema, whichever layout holds them, or
    None where it has none. ``columns``: only these (with the sort keys, while merging)."""
    wanted = None if columns is None else list(dict.fromkeys([*columns, *SORT_KEYS[table]]))
    path = results.table_path(out_dir, table, trial_id)
    compacted = (results.conform(table, results.read_table_file(path)) if storage.exists(path)
                 else None)
    found = [results.conform(table, results.read_table_file(p))
             for p in parts(out_dir, table, trial_id).values()]
    if wanted is not None:
        compacted = None if compacted is None else compacted.select(wanted)
        found = [p.select(wanted) for p in found]
    merged = merge(table, compacted, found)
    return merged if merged is None or columns is None else merged.select(list(columns))


def compact_trial(out_dir: str | os.PathLike, trial_id: str) -> None:
    """Merge the trial's parts of every per-epoch table into its one file per table, then
    remove the parts. Idempotent: a trial without parts is left as it is, and a compaction
    stopped between the write and the removals is finished by the next (same rows)."""
    for table in EPOCH_TABLES:
        found = parts(out_dir, table, trial_id)
        if not found:
            continue
        merged = read_trial_table(out_dir, table, trial_id)
        results.write_atomic(merged, results.table_path(out_dir, table, trial_id))
        for path in found.values():
            storage.delete(path)
        storage.delete_folder(part_folder(out_dir, table, trial_id))


def has_rows(out_dir: str | os.PathLike, table: str, trial_id: str) -> bool:
    """Whether the results folder holds any of the trial's rows of ``table`` (either layout)."""
    return (storage.exists(results.table_path(out_dir, table, trial_id))
            or bool(parts(out_dir, table, trial_id)))


def trial_epochs(out_dir: str | os.PathLike, trial_id: str) -> set[int]:
    """The epochs whose rows the trial's ``epochs`` table holds: the compacted file's and the
    parts' (these from their names, unread). Raises results.DamagedFileError for a compacted
    file that cannot be read."""
    path = results.table_path(out_dir, "epochs", trial_id)
    held = {r["epoch"] for r in _read_rows(path, ["epoch"])} if storage.exists(path) else set()
    return held | set(parts(out_dir, "epochs", trial_id))


def trial_finished(out_dir: str | os.PathLike, trial_id: str) -> bool:
    """Whether the results folder records the trial as done or diverged (an end, not a fault)
    and still holds the rows of every epoch it ran."""
    return trial_gap(out_dir, trial_id) is None


def trial_gap(out_dir: str | os.PathLike, trial_id: str) -> str | None:
    """Why the trial must run (again), or None if its results are whole: no end recorded, or
    an end whose epoch, layer or step rows are gone (a file moved away, a copy cut short).
    Raises results.DamagedFileError for a trials or epochs file that cannot be read."""
    path = results.table_path(out_dir, "trials", trial_id)
    name = f"{trial_id}.parquet"
    if not storage.exists(path):
        return "not run"
    row = _read_rows(path, ["status", "epochs_done"])[0]
    if row["status"] not in ("done", "diverged"):
        return row["status"]
    for table in REQUIRED_TABLES:
        if not has_rows(out_dir, table, trial_id):
            return f"trials/{name} records it {row['status']}, but {table}/{name} is missing"
    epochs = trial_epochs(out_dir, trial_id)
    if epochs != set(range(1, row["epochs_done"] + 1)):
        return (f"trials/{name} records {row['epochs_done']} epochs, but epochs/{name} "
                f"holds {len(epochs)}")
    return None


def _read_rows(path: Location, columns: list[str]) -> list[dict]:
    try:
        return results.read_table_file(path, columns=columns).to_pylist()
    except Exception as e:  # noqa: BLE001 -- whatever is wrong with it, the user gets one line
        raise results.DamagedFileError(f"{path} is unreadable ({type(e).__name__}: {e}); move it away "
                                       "and that trial runs again") from None


def sort_rows(table: str, rows: pa.Table) -> pa.Table:
    """``rows`` of ``table`` in its files' order (``SORT_KEYS``; a stable sort)."""
    return rows.sort_by([(k, "ascending") for k in SORT_KEYS[table]])


def _root(out_dir: str | os.PathLike) -> Location:
    return out_dir if storage.is_uri(out_dir) else os.fspath(out_dir)
