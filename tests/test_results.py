"""Writing results: an epoch reported again replaces its rows, on disk and through the callback.

A retried trial reports epochs again from its checkpoint, so replacing (not appending) is what
keeps the tables free of duplicates; these tests pin it down without Ray's timing.
"""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from study import results
from study.config import TrialConfig
from study.trainable import ROWS_KEY, ParquetWriterCallback
from tests.conftest import tiny_data
from tests.test_train import collect


def _epochs(tid: str, rows: list[tuple[int, float]]):
    return results.to_arrow("epochs", [dict(trial_id=tid, epoch=e, train_loss=v) for e, v in rows])


def test_an_epoch_written_again_replaces_its_rows(tmp_path):
    results.upsert_epoch_rows(tmp_path, "epochs", "t", _epochs("t", [(1, 1.0)]))
    results.upsert_epoch_rows(tmp_path, "epochs", "t", _epochs("t", [(1, 0.5)]))
    results.upsert_epoch_rows(tmp_path, "epochs", "t", _epochs("t", [(2, 0.25)]))
    got = results.read_table_file(results.table_path(tmp_path, "epochs", "t")).to_pandas()
    assert got[["epoch", "train_loss"]].values.tolist() == [[1, 0.5], [2, 0.25]]


def test_a_file_written_before_a_column_was_added_takes_new_rows(tmp_path):
    """A trial resumed in an older results folder: its layers file lacks weight_norm; the next
    epoch's rows go in, the old rows read null there and keep their values."""
    old_schema = pa.schema([f for f in results.TABLES["layers"] if f.name != "weight_norm"])
    meta = {results.VERSION_KEY: str(results.SCHEMA_VERSION).encode(), results.TABLE_KEY: b"layers"}
    old = pa.Table.from_pylist([dict(trial_id="t", epoch=1, layer="conv1", site="conv", mean=0.5)],
                               schema=old_schema.with_metadata(meta))
    path = results.table_path(tmp_path, "layers", "t")
    path.parent.mkdir()
    pq.write_table(old, path)
    new = results.to_arrow("layers", [dict(trial_id="t", epoch=2, layer="conv1", site="weight",
                                           weight_norm=3.0)])
    results.upsert_epoch_rows(tmp_path, "layers", "t", new)
    got = results.read_table_file(path).to_pylist()
    assert [(r["epoch"], r["site"], r["mean"], r["weight_norm"]) for r in got] == [
        (1, "conv", 0.5, None), (2, "weight", None, 3.0)]


def test_the_callback_writes_an_epoch_reported_twice_once(tmp_path):
    """What a trial retried from its epoch-1 checkpoint does: epochs 1, 2, then 2 again."""
    cfg = TrialConfig(norm="batch", epochs=2, lr=0.01, batch_size=32)
    records, _, _ = collect(cfg, tiny_data())
    writer = ParquetWriterCallback(str(tmp_path), "s", "tiny", dict(train=256, val=64, test=64))
    trial = SimpleNamespace(config={"trial": cfg.to_dict()})
    for record in (records[0], records[1], records[1]):
        result = {ROWS_KEY: pickle.dumps(record), "hostname": "h", "device": "cpu"}
        writer.on_trial_result(0, [], trial, result)
    tid = cfg.trial_id
    tables = {t: results.read_table_file(results.table_path(tmp_path, t, tid)).to_pandas()
              for t in ("epochs", "layers", "steps", "trials")}
    assert tables["epochs"]["epoch"].tolist() == [1, 2]
    assert not tables["layers"].duplicated(["epoch", "layer", "site"]).any()
    assert len(tables["layers"]) == 2 * len(records[0]["layers"])
    assert not tables["steps"].duplicated(["step"]).any()
    assert len(tables["steps"]) == sum(len(r["steps"]["step"]) for r in records)
    trial_row = tables["trials"].iloc[0]
    assert trial_row["epochs_done"] == 2 and trial_row["status"] == "done"
    assert trial_row["final_test_acc"] == records[1]["epoch"]["test_acc"]
    pd.testing.assert_series_equal(tables["epochs"]["train_loss"],
                                   pd.Series([r["epoch"]["train_loss"] for r in records],
                                             name="train_loss"))


def test_a_failed_trial_keeps_its_epochs_and_says_why(tmp_path):
    """on_trial_error (retries used up) in its second epoch: status error, the epoch written so
    far, the error. (A trial whose last epoch is written stays done: see test_sweep.)"""
    cfg = TrialConfig(norm="batch", epochs=2, lr=0.01, batch_size=32)
    records, _, _ = collect(cfg, tiny_data())
    writer = ParquetWriterCallback(str(tmp_path), "s", "tiny", dict(train=256, val=64, test=64))
    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory\n")
    trial = SimpleNamespace(config={"trial": cfg.to_dict()}, error_file=str(error_file))
    writer.on_trial_result(0, [], trial, {ROWS_KEY: pickle.dumps(records[0])})  # fails in epoch 2
    writer.on_trial_error(0, [], trial)
    row = results.read_table_file(results.table_path(tmp_path, "trials", cfg.trial_id)).to_pylist()[0]
    assert row["status"] == "error" and row["epochs_done"] == 1
    assert row["final_test_acc"] == records[0]["epoch"]["test_acc"]
    assert row["error"].rstrip().endswith("RuntimeError: CUDA out of memory")


def test_results_files_are_readable_as_the_umask_allows_not_only_by_their_owner(tmp_path):
    """A shared file system's group must be able to read them (mkstemp makes files 0600)."""
    import os
    import stat

    old = os.umask(0o027)
    try:
        results.upsert_epoch_rows(tmp_path, "epochs", "t", _epochs("t", [(1, 1.0)]))
        results.write_trial_row(tmp_path, dict(trial_id="t", status="running"))
    finally:
        os.umask(old)
    for table in ("epochs", "trials"):
        mode = stat.S_IMODE(os.stat(results.table_path(tmp_path, table, "t")).st_mode)
        assert mode == 0o640, (table, oct(mode))
