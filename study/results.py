"""The Parquet results schema and its files: the one contract between training and analysis.

Layout of a results folder (docs/design.md, "Results layout")::

    RESULTS/study.json                             the study's grid and settings (written by the sweep)
    RESULTS/trials/<trial_id>.parquet              one row per trial, rewritten whole
    RESULTS/<table>/<trial_id>/epoch=NNNN.parquet  an epoch's rows, while the trial runs
    RESULTS/<table>/<trial_id>.parquet             the trial's rows, compacted when it ended

Every non-``trials`` table has an ``epoch`` column, and writing rows for an epoch
*replaces* the rows of that epoch already written, so a retried or resumed trial never
duplicates rows; the per-epoch files and their compaction are ``study.epoch_parts``'. Files are
written to a temporary name and renamed (``write_atomic``), so a crash never leaves a
half-written file under a real name.

Conventions the analysis relies on: accuracies are fractions in [0, 1]; epochs count from 1;
``step`` is the trial's global step from 0; in ``probes``, the landscape columns (loss_min,
loss_max, loss_dev_min, loss_dev_max, grad_pred, beta_smooth) belong to the step and repeat on
each layer's row; in ``layers``, a row of site ``weight`` holds a weight layer's ``weight_norm``
at the epoch's end (its activation columns null), a row of an activation site none. Columns
added since a file was written read as null (``conform``; the analysis reads them as NaN).
``study.json`` holds ``name``, ``preset`` (the grid's settings), ``trials`` (each trial's
config), ``trial_ids`` (the grid, in order) and ``execution`` (how it ran: GPUs, packing,
threads, CPU layout, CUDA graphs).

This module imports only pyarrow and the standard library, so the analysis side
can use it without torch or Ray.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

# So is where results live (a local folder or a URI such as s3://bucket/prefix).
from study import storage
from study.storage import Location

# The variant registry reaches the analysis through this module, the one door between the wings.
from study.variants import (  # noqa: F401
    NOISE_SCOPES,
    NOISY_NORMS,
    NORMS,
    PARAM_DEFAULTS,
    PARAMS,
    VARIANTS,
    Variant,
)

SCHEMA_VERSION = 1
VERSION_KEY = b"bnstudy.schema_version"
TABLE_KEY = b"bnstudy.table"
TMP_SUFFIX = storage.TMP_SUFFIX

#: Layers whose weight-gradient norm is recorded every step (the CNN of docs/design.md, "The experiment").
GRAD_LAYERS: tuple[str, ...] = ("conv1", "conv2", "conv3", "fc1", "fc2")
#: Conv layers whose activations are recorded, and the two sites per layer.
ACT_LAYERS: tuple[str, ...] = ("conv1", "conv2", "conv3")
SITES: tuple[str, ...] = ("conv", "preact")
#: The site of a layers row that holds a weight layer's (GRAD_LAYERS) weight norm, not activations.
WEIGHT_SITE = "weight"
#: Probe layers (weights whose gradient the ICS probe compares).
PROBE_LAYERS: tuple[str, ...] = GRAD_LAYERS
STATUSES: tuple[str, ...] = ("running", "done", "diverged", "error")
#: ``python -m study.noise_eval``'s per-trial test accuracies, in the results folder (percent).
NOISE_EVAL_FILE = "noise_eval.csv"
NOISE_EVAL_COLUMNS = ("trial_id", "epoch", "expected_scale", "test_acc", "test_acc_mean_scaled")

_f64, _f32, _i64, _str, _bool = pa.float64(), pa.float32(), pa.int64(), pa.string(), pa.bool_()

TABLES: dict[str, pa.Schema] = {
    "trials": pa.schema(
        [
            ("trial_id", _str),
            ("study", _str),
            ("norm", _str),
            ("noise", _f64),
            ("noise_scope", _str),
            ("p", _f64),
            ("groups", _i64),
            ("lr", _f64),
            ("momentum", _f64),
            ("batch_size", _i64),
            ("epochs", _i64),
            ("seed", _i64),
            ("grad_every", _i64),
            ("probe_every", _i64),
            ("dataset", _str),
            ("train_size", _i64),
            ("val_size", _i64),
            ("test_size", _i64),
            ("status", _str),
            ("error", _str),
            ("epochs_done", _i64),
            ("final_train_loss", _f64),
            ("final_train_acc", _f64),
            ("final_val_loss", _f64),
            ("final_val_acc", _f64),
            ("final_test_loss", _f64),
            ("final_test_acc", _f64),
            ("wall_s", _f64),
            ("host", _str),
            ("device", _str),
            ("config_json", _str),
        ]
    ),
    "epochs": pa.schema(
        [
            ("trial_id", _str),
            ("epoch", _i64),
            ("train_loss", _f64),
            ("train_acc", _f64),
            ("val_loss", _f64),
            ("val_acc", _f64),
            ("test_loss", _f64),
            ("test_acc", _f64),
            ("lr", _f64),
            ("steps", _i64),
            ("wall_s", _f64),
            ("images_per_s", _f64),
            ("diverged", _bool),
            ("grad_norm_mean", _f64),
            ("grad_norm_std", _f64),
            ("grad_norm_max", _f64),
        ]
    ),
    "layers": pa.schema(
        [
            ("trial_id", _str),
            ("epoch", _i64),
            ("layer", _str),
            ("site", _str),
            ("count", _i64),
            ("mean", _f64),
            ("var", _f64),
            ("batch_mean_std", _f64),
            ("batch_var_std", _f64),
            ("hist_lo", _f64),
            ("hist_hi", _f64),
            ("hist", pa.list_(_i64)),
            ("weight_norm", _f64),
        ]
    ),
    "steps": pa.schema(
        [("trial_id", _str), ("step", _i64), ("epoch", _i64), ("loss", _f32), ("grad_norm", _f32)]
        + [(f"grad_norm_{name}", _f32) for name in GRAD_LAYERS]
    ),
    "probes": pa.schema(
        [
            ("trial_id", _str),
            ("step", _i64),
            ("epoch", _i64),
            ("layer", _str),
            ("ics_l2", _f64),
            ("ics_cos", _f64),
            ("loss_min", _f64),
            ("loss_max", _f64),
            ("loss_dev_min", _f64),
            ("loss_dev_max", _f64),
            ("grad_pred", _f64),
            ("beta_smooth", _f64),
            ("weight_norm", _f64),
        ]
    ),
}


def trial_id(norm: str, noise: float, lr: float, seed: int, p: float | None = None,
             groups: int | None = None) -> str:
    """A trial's readable, unique key in the grid: its results files' name and Tune's trial
    name, e.g. ``noisy_batch-noise1-lr0.01-seed0``, ``lp_batch-pinf-lr0.01-seed0``,
    ``group-groups8-lr0.01-seed0``: each parameter the variant takes (``Variant.params``), the
    others not, so that the ids of the variants without parameters never change."""
    given = dict(noise=noise, p=p, groups=groups)
    values = {k: PARAM_DEFAULTS[k] if v is None else v for k, v in given.items()}
    takes = VARIANTS[norm].params if norm in VARIANTS else ()
    params = "".join(f"-{k}{float(values[k]):g}" for k in PARAMS if k in takes)
    return f"{norm}{params}-lr{float(lr):g}-seed{int(seed)}"


class SchemaVersionError(ValueError):
    """A Parquet file was written by an unknown version of this schema."""


def table_path(out_dir: str | os.PathLike, table: str, trial_id: str) -> Location:
    """Where the rows of ``trial_id`` for ``table`` live (a local Path, or a URI where
    ``out_dir`` is one)."""
    return storage.join(out_dir if storage.is_uri(out_dir) else os.fspath(out_dir),
                        table, f"{trial_id}.parquet")


def to_arrow(table: str, rows: Mapping[str, Sequence] | Iterable[Mapping]) -> pa.Table:
    """Build a table of ``table``'s schema from column lists or an iterable of row dicts.

    Missing columns are filled with nulls; unknown columns are an error (a typo in a
    column name must not silently drop data).
    """
    schema = TABLES[table]
    if isinstance(rows, Mapping):
        columns = dict(rows)
    else:
        rows = list(rows)
        columns = {name: [r.get(name) for r in rows] for name in schema.names}
        unknown = {k for r in rows for k in r} - set(schema.names)
        if unknown:
            raise KeyError(f"unknown columns for table {table!r}: {sorted(unknown)}")
    unknown = set(columns) - set(schema.names)
    if unknown:
        raise KeyError(f"unknown columns for table {table!r}: {sorted(unknown)}")
    n = len(next(iter(columns.values()))) if columns else 0
    arrays = [
        pa.array(columns[f.name], type=f.type) if f.name in columns else pa.nulls(n, f.type)
        for f in schema
    ]
    meta = {VERSION_KEY: str(SCHEMA_VERSION).encode(), TABLE_KEY: table.encode()}
    return pa.Table.from_arrays(arrays, schema=schema.with_metadata(meta))


def check_version(path: str | os.PathLike, metadata: Mapping[bytes, bytes] | None) -> None:
    """Refuse a file whose schema version this code does not know."""
    version = (metadata or {}).get(VERSION_KEY)
    if version is None:
        raise SchemaVersionError(f"{path}: not a bnstudy results file (no schema version)")
    if version.decode() != str(SCHEMA_VERSION):
        raise SchemaVersionError(
            f"{path}: schema version {version.decode()}, but this code reads version "
            f"{SCHEMA_VERSION}; use the matching version of the analysis"
        )


def read_table_file(path: str | os.PathLike, columns: Sequence[str] | None = None) -> pa.Table:
    """Read one results file (or some of its columns), checking its schema version."""
    # a URI: one request for the whole (small) file, not one per footer read; locally the file
    # opened once (read_schema and read_table open it twice: a trial's compaction reads many)
    source = io.BytesIO(storage.read_bytes(path)) if storage.is_uri(path) else os.fspath(path)
    file = pq.ParquetFile(source)
    check_version(path, file.schema_arrow.metadata)
    return file.read(columns=columns)


def conform(table: str, data: pa.Table) -> pa.Table:
    """``data`` (a file of ``table``, perhaps written before some columns were added) in the
    current schema: the columns it lacks are null, so a resumed trial's old file takes new rows."""
    schema = TABLES[table]
    n = data.num_rows
    arrays = [data.column(f.name) if f.name in data.column_names else pa.nulls(n, f.type)
              for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema.with_metadata(data.schema.metadata))


def write_atomic(table: pa.Table, path: str | os.PathLike) -> None:
    """Write ``table`` to ``path`` whole or not at all (storage.write_bytes)."""
    if storage.is_uri(path):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes(path, sink.getvalue().to_pybytes())
        return
    with storage.atomic_local_file(path) as tmp:
        pq.write_table(table, tmp)


def write_trial_row(out_dir: str | os.PathLike, row: Mapping) -> None:
    """Write (replace) the one-row ``trials`` file of a trial."""
    write_atomic(to_arrow("trials", [row]), table_path(out_dir, "trials", row["trial_id"]))


class DamagedFileError(ValueError):
    """A trial's results file that cannot be read."""


# --- the tables written an epoch at a time (their files: study/epoch_parts.py) ---

#: The tables written an epoch at a time (``trials`` is one row per trial, rewritten whole).
EPOCH_TABLES: tuple[str, ...] = ("epochs", "layers", "steps", "probes")

#: Each table's row order, in a compacted file and in a merged read.
SORT_KEYS: dict[str, tuple[str, ...]] = {
    "epochs": ("epoch",),
    "layers": ("epoch", "layer", "site"),
    "steps": ("step",),
    "probes": ("step", "layer"),
}


def sort_rows(table: str, rows: pa.Table) -> pa.Table:
    """``rows`` of ``table`` in its files' order (``SORT_KEYS``; a stable sort)."""
    return rows.sort_by([(k, "ascending") for k in SORT_KEYS[table]])
