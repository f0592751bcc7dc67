"""Writing results: an epoch reported again replaces its rows, on disk and through the callback;
each epoch in its own file, compacted when the trial ends (study/trial_files.py).

A retried trial reports epochs again from its checkpoint, so replacing (not appending) is what
keeps the tables free of duplicates; these tests pin it down without Ray's timing.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.synthetic import trial_records, write_synthetic_study
from study import epoch_parts, results, trial_files
from study.config import TrialConfig
from study.results_writer import ROWS_KEY, ParquetWriterCallback, status_record, write_epoch_record
from tests.conftest import tiny_data
from tests.test_train import collect


def _epochs(tid: str, rows: list[tuple[int, float]]):
    return results.to_arrow("epochs", [dict(trial_id=tid, epoch=e, train_loss=v) for e, v in rows])


def test_an_epoch_written_again_replaces_its_rows(tmp_path):
    epoch_parts.write_epoch_rows(tmp_path, "epochs", "t", _epochs("t", [(1, 1.0)]))
    epoch_parts.write_epoch_rows(tmp_path, "epochs", "t", _epochs("t", [(1, 0.5)]))
    epoch_parts.write_epoch_rows(tmp_path, "epochs", "t", _epochs("t", [(2, 0.25)]))
    assert sorted(p.name for p in (tmp_path / "epochs" / "t").iterdir()) == [
        "epoch=0001.parquet", "epoch=0002.parquet"]
    got = epoch_parts.read_trial_table(tmp_path, "epochs", "t").to_pandas()
    assert got[["epoch", "train_loss"]].values.tolist() == [[1, 0.5], [2, 0.25]]
    epoch_parts.compact_trial(tmp_path, "t")
    assert not (tmp_path / "epochs" / "t").exists()
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
    epoch_parts.write_epoch_rows(tmp_path, "layers", "t", new)
    epoch_parts.compact_trial(tmp_path, "t")
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
    import stat

    old = os.umask(0o027)
    try:
        epoch_parts.write_epoch_rows(tmp_path, "epochs", "t", _epochs("t", [(1, 1.0)]))
        results.write_trial_row(tmp_path, dict(trial_id="t", status="running"))
        part = stat.S_IMODE(os.stat(epoch_parts.part_path(tmp_path, "epochs", "t", 1)).st_mode)
        epoch_parts.compact_trial(tmp_path, "t")
    finally:
        os.umask(old)
    assert part == 0o640, oct(part)
    for path in (results.table_path(tmp_path, t, "t") for t in ("epochs", "trials")):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode == 0o640, (path, oct(mode))


# --- one file per epoch, compaction when a trial ends (study/trial_files.py) ---

STEPS = 40  # step rows per made-up epoch: enough rows to be whole or not, few to write fast


def _made_up(epochs: int, seed: int = 0, steps: int = STEPS) -> list[dict]:
    """A BN trial's records as run_trial hands them over (analysis.synthetic's made-up values)."""
    return trial_records("batch", 0.0, 0.01, 0, epochs=epochs, rng=np.random.default_rng(seed),
                         steps_per_epoch=steps, hist_bins=8)


def _writer(out) -> ParquetWriterCallback:
    return ParquetWriterCallback(str(out), "s", "synthetic", dict(train=256, val=64, test=64))


def _report(writer: ParquetWriterCallback, cfg: TrialConfig, record: dict) -> None:
    trial = SimpleNamespace(config={"trial": cfg.to_dict()}, error_file=None)
    writer.on_trial_result(0, [], trial, {ROWS_KEY: pickle.dumps(record), "hostname": "h",
                                          "device": "cpu"})


def _expected(table: str, tid: str, records_by_epoch: dict[int, dict]) -> pd.DataFrame:
    """The rows ``records_by_epoch`` should leave in ``table``, built from the records alone."""
    rows = []
    for epoch, r in sorted(records_by_epoch.items()):
        if table == "epochs":
            rows.append(dict(r["epoch"], trial_id=tid))
        elif table == "layers":
            rows.extend(dict(x, trial_id=tid, epoch=epoch) for x in r["layers"])
        else:
            cols = r["steps"]
            rows.extend({**{k: cols[k][i].item() for k in cols}, "trial_id": tid}
                        for i in range(len(cols["step"])))
    keys = {"epochs": ["epoch"], "layers": ["epoch", "layer", "site"], "steps": ["step"]}[table]
    frame = results.to_arrow(table, rows).to_pandas()
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)


def _held(out, table: str, tid: str) -> pd.DataFrame:
    return epoch_parts.read_trial_table(out, table, tid).to_pandas()


def test_a_report_neither_reads_nor_rewrites_the_earlier_epochs(tmp_path, monkeypatch):
    """What keeps a report's cost flat: the third epoch's report reads no results file and
    leaves the first two epochs' files as they were; the trials row still counts all three."""
    cfg = TrialConfig(norm="batch", lr=0.01, epochs=4)
    records, writer = _made_up(4), _writer(tmp_path)
    for record in records[:2]:
        _report(writer, cfg, record)
    earlier = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.rglob("epoch=*.parquet")}
    assert len(earlier) == 2 * 3  # epochs, layers, steps (no probes)
    read, real = [], results.read_table_file
    monkeypatch.setattr(results, "read_table_file",
                        lambda path, *a, **k: read.append(path) or real(path, *a, **k))
    _report(writer, cfg, records[2])
    assert read == []
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in earlier} == earlier
    monkeypatch.undo()
    row = results.read_table_file(results.table_path(tmp_path, "trials", cfg.trial_id)).to_pylist()[0]
    assert (row["status"], row["epochs_done"]) == ("running", 3)
    assert row["wall_s"] == sum(r["epoch"]["wall_s"] for r in records[:3])
    assert row["final_test_acc"] == records[2]["epoch"]["test_acc"]


def test_compaction_is_idempotent_and_a_stopped_one_is_finished_by_the_next(tmp_path):
    out = tmp_path / "s"
    write_synthetic_study(out, variants=(("batch", 0.0),), lrs=(0.01,), seeds=(0,), epochs=3,
                          steps_per_epoch=20, hist_bins=8, probe_every=5, compact=False)
    tid = results.trial_id("batch", 0.0, 0.01, 0)
    tables = results.EPOCH_TABLES
    saved = {p: p.read_bytes() for t in tables for p in (out / t / tid).iterdir()}
    assert len(saved) == 3 * len(tables)
    # the reference: every part read on its own, put in the tables' order
    expected = {t: pd.concat([pq.read_table(p).to_pandas() for p in sorted((out / t / tid).iterdir())])
                .sort_values(list(results.SORT_KEYS[t]), kind="stable").reset_index(drop=True)
                for t in tables}

    epoch_parts.compact_trial(out, tid)
    compacted = {t: results.table_path(out, t, tid) for t in tables}
    first = {t: p.read_bytes() for t, p in compacted.items()}
    for t in tables:
        assert not (out / t / tid).exists()
        pd.testing.assert_frame_equal(pq.read_table(compacted[t]).to_pandas(), expected[t], check_exact=True)

    stamps = {t: p.stat().st_mtime_ns for t, p in compacted.items()}
    epoch_parts.compact_trial(out, tid)  # nothing left to merge: nothing is written
    assert {t: p.stat().st_mtime_ns for t, p in compacted.items()} == stamps

    for path, data in saved.items():  # stopped after writing the compacted files, parts not yet removed
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
    for t in tables:
        pd.testing.assert_frame_equal(_held(out, t, tid), expected[t], check_exact=True)
    epoch_parts.compact_trial(out, tid)
    assert {t: p.read_bytes() for t, p in compacted.items()} == first
    assert not any((out / t / tid).exists() for t in tables)


def test_a_trial_resumed_after_compaction_appends_and_replaces_its_own_epochs(tmp_path):
    """Out of retries in epoch 3, the trial is compacted as failed; a resumed study (a new
    driver) retries it from its epoch-1 checkpoint, so epoch 2 comes again (other numbers),
    then 3 and 4: the parts go on top of the compacted file, and its end compacts them."""
    cfg = TrialConfig(norm="batch", lr=0.01, epochs=4)
    tid = cfg.trial_id
    first, second = _made_up(4, seed=0), _made_up(4, seed=1)
    assert first[1]["epoch"]["test_acc"] != second[1]["epoch"]["test_acc"]
    writer = _writer(tmp_path)
    for record in first[:2]:
        _report(writer, cfg, record)
    writer.on_trial_error(0, [], SimpleNamespace(config={"trial": cfg.to_dict()}, error_file=None))
    assert not (tmp_path / "epochs" / tid).exists() and results.table_path(tmp_path, "epochs", tid).exists()
    assert trial_files.trial_gap(tmp_path, tid) == "error"

    resumed = _writer(tmp_path)
    for record in second[1:3]:
        _report(resumed, cfg, record)
    mixed = {1: first[0], 2: second[1], 3: second[2]}
    for table in ("epochs", "layers", "steps"):
        assert sorted(epoch_parts.parts(tmp_path, table, tid)) == [2, 3]
        pd.testing.assert_frame_equal(_held(tmp_path, table, tid), _expected(table, tid, mixed))
    row = results.read_table_file(results.table_path(tmp_path, "trials", tid)).to_pylist()[0]
    assert (row["status"], row["epochs_done"]) == ("running", 3)
    assert row["final_test_acc"] == second[2]["epoch"]["test_acc"]

    _report(resumed, cfg, second[3])
    whole = {**mixed, 4: second[3]}
    for table in ("epochs", "layers", "steps"):
        assert not (tmp_path / table / tid).exists()
        got = results.read_table_file(results.table_path(tmp_path, table, tid)).to_pandas()
        pd.testing.assert_frame_equal(got, _expected(table, tid, whole))
    row = results.read_table_file(results.table_path(tmp_path, "trials", tid)).to_pylist()[0]
    assert (row["status"], row["epochs_done"]) == ("done", 4)
    assert row["wall_s"] == sum(r["epoch"]["wall_s"] for r in whole.values())
    assert trial_files.trial_finished(tmp_path, tid)


def _write_until_killed(out: str, ready, writes: str) -> None:
    """A process writing a long trial's epochs, full-size, until it is killed: a driver
    (``writes="driver"``: through the callback) or the trial itself (``"trial"``)."""
    cfg = TrialConfig(norm="batch", lr=0.01, epochs=200)
    records = trial_records("batch", 0.0, 0.01, 0, epochs=200, rng=np.random.default_rng(0),
                            steps_per_epoch=2500, hist_bins=128)
    writer = _writer(out)
    ready.set()
    for record in records:
        if writes == "trial":
            write_epoch_record(out, cfg.trial_id, record)
        else:
            _report(writer, cfg, record)


@pytest.mark.parametrize("writes", ["driver", "trial"])
def test_a_killed_writer_leaves_every_table_readable_with_whole_epochs_only(tmp_path, writes):
    """SIGKILL at three moments in a writing driver, or in a trial that writes its own rows:
    every table reads, through the writer's reader and the analysis', and holds each epoch it
    holds whole, the epochs table no epoch the other tables lack (its row is written last)."""
    from analysis import folder as analysis_folder

    tid = TrialConfig(norm="batch", lr=0.01, epochs=200).trial_id
    context = multiprocessing.get_context("fork")  # the child needs nothing the parent lacks
    for n, (after, delay) in enumerate(((1, 0.0), (5, 0.003), (12, 0.007))):
        out = tmp_path / f"killed{n}"
        ready = context.Event()
        child = context.Process(target=_write_until_killed, args=(str(out), ready, writes))
        child.start()
        assert ready.wait(60)
        # kill once `after` epochs are written, then a moment later: mid-epoch, at any speed
        deadline = time.monotonic() + 60
        while len(epoch_parts.parts(out, "epochs", tid)) < after and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        held = {t: _held(out, t, tid) for t in ("epochs", "layers", "steps")}
        epochs = held["epochs"]["epoch"].tolist()
        assert epochs == list(range(1, len(epochs) + 1)) and 0 < len(epochs) < 200
        per_epoch = {"layers": len(results.ACT_LAYERS) * len(results.SITES) + len(results.GRAD_LAYERS),
                     "steps": 2500}
        for table, rows in per_epoch.items():
            counts = held[table].groupby("epoch").size()
            assert (counts == rows).all(), (table, counts[counts != rows])
            assert set(epochs) <= set(counts.index) <= set(epochs) | {len(epochs) + 1}
        assert held["steps"]["step"].tolist() == list(range(len(held["steps"])))
        for table in ("epochs", "layers", "steps"):
            files = analysis_folder.table_files(out / table)
            read = analysis_folder.read_table(files, table).to_pandas()
            assert len(read) == len(held[table])


def test_whether_a_trial_is_whole_is_read_from_either_layout(tmp_path):
    """trial_gap on a finished trial left in per-epoch files (a driver killed before it
    compacted), and on its compacted copy with a newer part on top: whole; without its steps
    rows, or without an epoch's row, it must run again, and the reason says which."""
    kw = dict(variants=(("batch", 0.0),), lrs=(0.01,), seeds=(0,), epochs=3, steps_per_epoch=20,
              hist_bins=8)
    tid = results.trial_id("batch", 0.0, 0.01, 0)
    write_synthetic_study(tmp_path / "parts", compact=False, **kw)
    write_synthetic_study(tmp_path / "compacted", **kw)
    epoch_parts.write_epoch_rows(tmp_path / "compacted", "epochs", tid, epoch_parts.read_trial_table(
        tmp_path / "parts", "epochs", tid).slice(2, 1))
    for out in (tmp_path / "parts", tmp_path / "compacted"):
        assert trial_files.trial_gap(out, tid) is None
    (tmp_path / "parts" / "epochs" / tid / "epoch=0002.parquet").unlink()
    assert trial_files.trial_gap(tmp_path / "parts", tid) == (
        f"trials/{tid}.parquet records 3 epochs, but epochs/{tid}.parquet holds 2")
    for path in (tmp_path / "parts" / "steps" / tid).iterdir():
        path.unlink()
    assert trial_files.trial_gap(tmp_path / "parts", tid) == (
        f"trials/{tid}.parquet records it done, but steps/{tid}.parquet is missing")


def test_an_epoch_without_a_recorded_step_still_leaves_the_trial_whole(tmp_path):
    """grad_every beyond an epoch's steps records no step row: the steps table is written
    empty, not left missing (which would make a finished trial run again forever)."""
    cfg = TrialConfig(norm="batch", lr=0.01, epochs=2)
    records, writer = _made_up(2), _writer(tmp_path)
    for record in records:
        record["steps"] = {k: v[:0] for k, v in record["steps"].items()}
        _report(writer, cfg, record)
    assert results.read_table_file(results.table_path(tmp_path, "steps", cfg.trial_id)).num_rows == 0
    assert trial_files.trial_gap(tmp_path, cfg.trial_id) is None


def _compacted(out, tid: str, tables=("trials", *results.EPOCH_TABLES)) -> dict[str, pd.DataFrame]:
    return {t: results.read_table_file(results.table_path(out, t, tid)).to_pandas() for t in tables}


def test_a_trial_that_writes_its_own_rows_leaves_the_driver_only_its_trials_row(tmp_path, monkeypatch):
    """The trial writes each epoch (and compacts at its end) and sends its status record; the
    driver writes no epoch rows and compacts nothing, and the files equal those of the same
    records sent whole through the driver, trials row included."""
    cfg = TrialConfig(norm="batch", lr=0.01, epochs=3)
    tid, records = cfg.trial_id, trial_records("batch", 0.0, 0.01, 0, epochs=3, rng=np.random.default_rng(0),
                                               steps_per_epoch=STEPS, hist_bins=8, probe_every=7)
    through = _writer(tmp_path / "driver")
    for record in records:
        _report(through, cfg, record)

    def forbidden(*args, **kwargs):
        raise AssertionError("the driver wrote or compacted a trial's epoch rows")

    driver = _writer(tmp_path / "trial")
    for record in records:
        write_epoch_record(str(tmp_path / "trial"), tid, record)
        if record["status"] == "done":
            epoch_parts.compact_trial(str(tmp_path / "trial"), tid)
        with monkeypatch.context() as m:
            m.setattr(epoch_parts, "write_epoch_rows", forbidden)
            m.setattr(epoch_parts, "compact_trial", forbidden)
            _report(driver, cfg, status_record(record))
    expected, got = _compacted(tmp_path / "driver", tid), _compacted(tmp_path / "trial", tid)
    assert len(got["probes"])
    for table in expected:
        pd.testing.assert_frame_equal(got[table], expected[table], check_exact=True, obj=table)


def test_compaction_off_the_drivers_thread_gives_the_same_files(tmp_path):
    """compact_in_background: the ended trials' compactions and final trials rows run on the
    writer's worker thread; after flush the files equal those written inline."""
    trials = [TrialConfig(norm="batch", lr=0.01, epochs=3, seed=s) for s in (0, 1)]
    writers = {"inline": _writer(tmp_path / "inline"),
               "background": ParquetWriterCallback(str(tmp_path / "background"), "s", "synthetic",
                                                   dict(train=256, val=64, test=64),
                                                   compact_in_background=True)}
    for seed, cfg in enumerate(trials):
        for record in _made_up(3, seed=seed):
            for writer in writers.values():
                _report(writer, cfg, record)
    writers["background"].flush()
    for cfg in trials:
        tables = ("trials", "epochs", "layers", "steps")  # made-up trials without probes
        expected = _compacted(tmp_path / "inline", cfg.trial_id, tables)
        got = _compacted(tmp_path / "background", cfg.trial_id, tables)
        assert got["trials"]["status"].tolist() == ["done"]
        assert not (tmp_path / "background" / "steps" / cfg.trial_id).exists()
        for table in tables:
            pd.testing.assert_frame_equal(got[table], expected[table], check_exact=True, obj=table)
