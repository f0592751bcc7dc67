"""Whether a trial's results are whole, read from either layout of its files (docs/design.md,
"Results layout"): one compacted file per table, per-epoch parts, or both (``study.results``
writes, merges and reads them). The sweep's planning, the end of a study and the writer ask it.
"""

from __future__ import annotations

import os

from study import epoch_parts, results, storage
from study.storage import Location

#: The tables a finished trial must hold rows in (``probes`` only where it was probed).
REQUIRED_TABLES: tuple[str, ...] = ("epochs", "layers", "steps")


def has_rows(out_dir: str | os.PathLike, table: str, trial_id: str) -> bool:
    """Whether the results folder holds any of the trial's rows of ``table`` (either layout)."""
    return (storage.exists(results.table_path(out_dir, table, trial_id))
            or bool(epoch_parts.parts(out_dir, table, trial_id)))


def trial_epochs(out_dir: str | os.PathLike, trial_id: str) -> set[int]:
    """The epochs whose rows the trial's ``epochs`` table holds: the compacted file's and the
    parts' (these from their names, unread). Raises results.DamagedFileError for a compacted
    file that cannot be read."""
    path = results.table_path(out_dir, "epochs", trial_id)
    held = {r["epoch"] for r in _read_rows(path, ["epoch"])} if storage.exists(path) else set()
    return held | set(epoch_parts.parts(out_dir, "epochs", trial_id))


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
