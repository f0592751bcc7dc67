"""A trial's per-epoch part files and their compaction (docs/design.md, "Results layout").

    RESULTS/<table>/<trial_id>/epoch=NNNN.parquet  an epoch's rows, while the trial runs
    RESULTS/<table>/<trial_id>.parquet             the trial's rows, compacted when it ended

An epoch is written into its own files, replacing that epoch's part if there is one, without
reading or rewriting the others, so a report costs the same at any epoch and a retried or
resumed trial never duplicates rows. A trial that ends is compacted (the merged file written
first, then the parts removed, so compacting again gives the same file); where an epoch has a
part, its rows replace that epoch's rows of the compacted file (parts are newer: a trial
resumed after it was compacted appends parts on top). Whether a trial's results are whole is
``study.trial_files``'.

The schema, each table's row order and the atomic file writes are ``study.results``'. This
module imports only pyarrow and the standard library besides them: the analysis reads parts
through it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from study import results, storage
from study.storage import Location

_PART = re.compile(r"^epoch=(\d+)\.parquet$")


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
        table: one of ``results.EPOCH_TABLES``.
        trial_id: the trial the rows belong to.
        new: the rows, in ``TABLES[table]``'s schema.
        epoch: the epoch ``new`` is of, where it may have no rows (an epoch without a recorded
            step, when ``grad_every`` exceeds its steps): its part is then written empty, so
            that the table is not missing from a trial that ran.
    """
    epochs = sorted(set(new.column("epoch").to_pylist()))
    if not epochs and epoch is not None:
        results.write_atomic(new, part_path(out_dir, table, trial_id, epoch))
    for epoch in epochs:  # a trial reports one epoch at a time: one part, nothing filtered
        rows = new if len(epochs) == 1 else new.filter(pc.equal(new.column("epoch"), epoch))
        results.write_atomic(results.sort_rows(table, rows), part_path(out_dir, table, trial_id, epoch))


def merge(table: str, compacted: pa.Table | None, new_parts: Sequence[pa.Table]) -> pa.Table | None:
    """One trial's rows of ``table`` from its compacted file (or None) and its parts: the
    parts' rows replace the compacted file's rows of their epochs; sorted by ``results.SORT_KEYS``.
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
        return results.sort_rows(table, pieces[0])
    return results.sort_rows(table, pa.concat_tables(pieces, promote_options="permissive"))


def read_trial_table(out_dir: str | os.PathLike, table: str, trial_id: str,
                     columns: Sequence[str] | None = None) -> pa.Table | None:
    """The trial's rows of ``table`` in the current schema, whichever layout holds them, or
    None where it has none. ``columns``: only these (with the sort keys, while merging)."""
    wanted = None if columns is None else list(dict.fromkeys([*columns, *results.SORT_KEYS[table]]))
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
    for table in results.EPOCH_TABLES:
        found = parts(out_dir, table, trial_id)
        if not found:
            continue
        merged = read_trial_table(out_dir, table, trial_id)
        results.write_atomic(merged, results.table_path(out_dir, table, trial_id))
        for path in found.values():
            storage.delete(path)
        storage.delete_folder(part_folder(out_dir, table, trial_id))


def _root(out_dir: str | os.PathLike) -> Location:
    return out_dir if storage.is_uri(out_dir) else os.fspath(out_dir)
